"""The code a stage runs: found from its imports; its key, the digest of its syntax."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import REPO

from workflow_scripts import families, stage
from workflow_scripts.models import family_module
from workflow_scripts.stage_code import PLUMBING, code_digest, code_key, module_sources, syntax


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


SOURCE = '''"""A module."""

import math


def area(radius):
    """The area of a circle."""
    return math.pi * radius**2  # pi r squared
'''


def test_comments_docstrings_and_formatting_are_not_code():
    reformatted = (
        '"""Another docstring, longer,\n\nover lines."""\nimport math\n\n'
        "def area( radius ):\n    '''Edited.'''\n\n    # a new comment\n"
        "    return (math.pi *\n            radius ** 2)\n"
    )
    assert syntax(reformatted) == syntax(SOURCE)


@pytest.mark.parametrize(
    "edited",
    [
        SOURCE.replace("radius**2", "radius**3"),
        SOURCE.replace("math.pi", "math.tau"),
        SOURCE + "\nRADIUS = 1\n",
        SOURCE.replace('    """The area of a circle."""\n', '    "The area."\n    x = 1\n'),
        # a string that is not the first statement is code, not a docstring
        SOURCE.replace("    return", '    "not a docstring"\n    return'),
    ],
)
def test_any_change_to_what_the_code_does_is_code(edited):
    assert syntax(edited) != syntax(SOURCE)


def test_the_syntax_is_the_code_written_back_plainly():
    """Its form is fixed (ast.unparse): a key does not change with the Python that computes it."""
    assert syntax(SOURCE) == "import math\n\ndef area(radius):\n    return math.pi * radius ** 2"


def test_a_function_that_is_only_a_docstring_stays_valid():
    assert syntax('def f():\n    """Only this."""\n') == syntax("def f():\n    pass\n")


def checkout_copy(tmp_path: Path) -> Path:
    shutil.copytree(
        REPO / "workflow_scripts",
        tmp_path / "workflow_scripts",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return tmp_path / "workflow_scripts"


def test_the_key_follows_the_code_not_its_comments_or_location(tmp_path):
    files = module_sources("workflow_scripts.layer_stats")
    package = checkout_copy(tmp_path)
    moved = [str(package.parent / Path(f).relative_to(REPO)) for f in files]
    assert code_digest(moved) == code_digest(files)  # another checkout, same key
    stats = package / "streaming_stats.py"
    text = stats.read_text()
    stats.write_text(text.replace('"""', '"""Edited.\n', 1) + "\n# a comment\n\n\n")
    assert code_digest(moved) == code_digest(files)
    stats.write_text(text + "\nEDITED = True\n")
    assert code_digest(moved) != code_digest(files)


def test_plumbing_is_no_stages_code():
    for rule, module in stage.STAGES.items():
        files = {Path(f).name for f in module_sources(module)}
        assert not files & {"stage.py", "output_cache.py", "stage_code.py"}, rule
    assert {"workflow_scripts.stage", "workflow_scripts.output_cache"} <= PLUMBING


def test_stages_have_keys_of_their_own():
    keys = {code_key(module) for module in set(stage.STAGES.values())}
    assert len(keys) == len(set(stage.STAGES.values()))
