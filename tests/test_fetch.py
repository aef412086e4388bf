"""fetch_model: the stored layout, its manifest, local copies and their checks, hub pinning."""

from __future__ import annotations

import copy
import json
import shutil
from types import SimpleNamespace

import pytest
from support import TINY_SPECS

from workflow_scripts.fetch_model import count_parameters, fetch, resolve_revision
from workflow_scripts.models import load_adapter
from workflow_scripts.models.store import (
    MANIFEST,
    WEIGHTS,
    ModelDirError,
    read_manifest,
    sha256_file,
)


@pytest.mark.parametrize("family", sorted(TINY_SPECS))
def test_manifest_lists_every_file_with_its_digest(model_dirs, family):
    directory = model_dirs[family]
    manifest = json.loads((directory / MANIFEST).read_text())
    files = sorted(p.name for p in directory.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == files
    assert WEIGHTS in files and "config.json" in files
    assert all(manifest["files"][f] == sha256_file(directory / f) for f in files)
    assert manifest["source"] == "init:" and manifest["family"] == family
    assert manifest["revision"] is None and manifest["init"]["seed"] == 0
    adapter, _ = load_adapter(directory)
    assert manifest["parameters"] == sum(p.numel() for p in adapter.model.parameters())
    if family != "resnet":
        assert "tokenizer.json" in files


def test_init_is_deterministic(model_dirs, tmp_path):
    fetch(copy.deepcopy(TINY_SPECS["roberta"]), tmp_path / "again")
    assert (
        read_manifest(tmp_path / "again")["files"] == read_manifest(model_dirs["roberta"])["files"]
    )
    other = {**copy.deepcopy(TINY_SPECS["roberta"]), "seed": 1}
    fetch(other, tmp_path / "seed1")
    assert (
        read_manifest(tmp_path / "seed1")["files"][WEIGHTS]
        != read_manifest(model_dirs["roberta"])["files"][WEIGHTS]
    )


def test_local_copy_keeps_files_and_origin(model_dirs, tmp_path):
    manifest = fetch({"family": "gpt2", "source": f"local:{model_dirs['gpt2']}"}, tmp_path / "copy")
    assert manifest["files"] == read_manifest(model_dirs["gpt2"])["files"]
    assert manifest["origin"] == "init:" and manifest["source"].startswith("local:")


def test_local_save_pretrained_directory_without_manifest(model_dirs, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(model_dirs["bert"], plain)
    (plain / MANIFEST).unlink()
    manifest = fetch({"family": "bert", "source": f"local:{plain}"}, tmp_path / "out")
    assert manifest["parameters"] == count_parameters(plain, "bert") > 0


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelDirError, match="nowhere.*not a directory"):
        fetch({"family": "gpt2", "source": f"local:{tmp_path}/nowhere"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_local_directory_without_weights(model_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["gpt2"], broken)
    (broken / WEIGHTS).unlink()
    with pytest.raises(ModelDirError, match="has no model.safetensors"):
        fetch({"family": "gpt2", "source": f"local:{broken}"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [broken]  # no temporary directory left behind


def test_local_directory_whose_files_do_not_match_the_manifest(model_dirs, tmp_path):
    altered = tmp_path / "altered"
    shutil.copytree(model_dirs["gpt2"], altered)
    with open(altered / "config.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(ModelDirError, match="config.json does not match its sha256"):
        fetch({"family": "gpt2", "source": f"local:{altered}"}, tmp_path / "out")
    with pytest.raises(ModelDirError, match="does not match"):
        load_adapter(altered)


def test_local_family_must_match(model_dirs, tmp_path):
    with pytest.raises(ModelDirError, match="family 'gpt2'.*config says 'roberta'"):
        fetch({"family": "roberta", "source": f"local:{model_dirs['gpt2']}"}, tmp_path / "out")


def test_a_failed_fetch_keeps_the_previous_directory_intact(model_dirs, tmp_path):
    out = tmp_path / "model"
    fetch(copy.deepcopy(TINY_SPECS["gpt2"]), out)
    before = read_manifest(out)
    with pytest.raises(ModelDirError):
        fetch({"family": "gpt2", "source": f"local:{tmp_path}/nowhere"}, out)
    assert read_manifest(out) == before


class FakeHub:
    """Stands in for huggingface_hub.HfApi: answers model_info for a branch."""

    def __init__(self, sha):
        self.sha, self.calls = sha, []

    def model_info(self, repo, revision):
        self.calls.append((repo, revision))
        return SimpleNamespace(sha=self.sha)


def test_hub_branch_is_pinned_to_its_commit():
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub = FakeHub(commit)
    assert resolve_revision("openai-community/gpt2", "main", hub) == commit
    assert hub.calls == [("openai-community/gpt2", "main")]


def test_hub_commit_is_kept_without_asking():
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    hub = FakeHub("not used")
    assert resolve_revision("gpt2", commit, hub) == commit and hub.calls == []


def test_hub_answer_that_is_not_a_commit_is_refused():
    with pytest.raises(ValueError, match="not a commit"):
        resolve_revision("gpt2", "main", FakeHub(None))


def test_a_local_checkpoint_of_another_model_type_is_refused(model_dirs, tmp_path):
    source = tmp_path / "bert-like"
    shutil.copytree(model_dirs["bert"], source)
    (source / MANIFEST).unlink()  # a plain save_pretrained directory: only config.json says
    for family in ("gpt2", "roberta"):
        with pytest.raises(
            ValueError, match=rf"local model .* is a 'bert' model, not family '{family}'"
        ):
            fetch({"family": family, "source": f"local:{source}"}, tmp_path / f"out-{family}")
        assert not (tmp_path / f"out-{family}").exists()
    fetch({"family": "bert", "source": f"local:{source}"}, tmp_path / "out-bert")
