"""The code a stage runs: found from its imports, declared as its rule's inputs, digested."""

from __future__ import annotations

import shutil
from pathlib import Path

from support import REPO

from workflow_scripts import families
from workflow_scripts.models import family_module
from workflow_scripts.stage_code import code_digest, module_sources


def names(paths):
    return {str(Path(p).relative_to(REPO)) for p in paths}


def test_extraction_runs_the_store_but_not_other_stages_or_model_families():
    files = names(module_sources("workflow_scripts.extract"))
    assert {
        "workflow_scripts/extract.py",
        "workflow_scripts/activations.py",
        "workflow_scripts/models/__init__.py",
        "workflow_scripts/models/store.py",
        "workflow_scripts/__init__.py",
    } <= files
    # families are imported by name: the rule adds the one family its model needs
    assert (
        not {"workflow_scripts/models/resnet.py", "workflow_scripts/models/transformers_text.py"}
        & files
    )
    assert "workflow_scripts/prepare_data.py" not in files
    assert "workflow_scripts/fetch_model.py" not in files
    assert "workflow_scripts/config.py" not in files  # validation edits rerun nothing


def test_each_family_module_brings_its_own_code_only():
    text = names(module_sources("workflow_scripts.extract", families.get("gpt2").module))
    image = names(module_sources("workflow_scripts.extract", families.get("resnet").module))
    assert {
        "workflow_scripts/models/transformers_text.py",
        "workflow_scripts/models/builtin_tokenizer.py",
    } <= text
    # model code takes the built-in vocabulary, not the dataset generator
    assert "workflow_scripts/data/builtin.py" not in text | image
    assert "workflow_scripts/models/resnet.py" not in text
    assert "workflow_scripts/models/resnet.py" in image
    assert "workflow_scripts/models/transformers_text.py" not in image


def test_every_family_module_has_the_family_interface():
    for family in families.FAMILIES:
        module = family_module(family)
        assert all(callable(getattr(module, name)) for name in ("init", "load", "write", "adapter"))


def test_data_preparation_does_not_run_model_code():
    files = names(module_sources("workflow_scripts.prepare_data"))
    assert "workflow_scripts/data/store.py" in files
    assert not any(f.startswith("workflow_scripts/models/") for f in files)


def test_digest_follows_content_and_package_path_not_location(tmp_path):
    files = module_sources("workflow_scripts.prepare_data")
    copy = tmp_path / "checkout"
    shutil.copytree(REPO / "workflow_scripts", copy / "workflow_scripts")
    moved = [str(copy / Path(f).relative_to(REPO)) for f in files]
    assert code_digest(moved) == code_digest(files)  # another checkout, same digest
    with open(moved[0], "a") as handle:
        handle.write("\n# edited\n")
    assert code_digest(moved) != code_digest(files)


def test_a_family_record_is_code_of_its_own_family_only():
    gpt2, gptr2, resnet = (families.get(name) for name in ("gpt2", "gptr2", "resnet"))
    text = names(module_sources("workflow_scripts.extract", gpt2.module, gpt2.record))
    derived = names(module_sources("workflow_scripts.extract", gptr2.module, gptr2.record))
    registry = {f for f in text | derived if f.startswith("workflow_scripts/families/")}
    assert registry == {
        f"workflow_scripts/families/{name}.py" for name in ("__init__", "gpt2", "gptr2")
    }
    # adding or editing another family's record changes nothing a GPT-2 job runs
    assert "workflow_scripts/families/resnet.py" not in text
    assert "workflow_scripts/families/gpt2.py" not in names(
        module_sources("workflow_scripts.extract", resnet.module, resnet.record)
    )
