"""fetch_model: the stored layout, its manifest, local copies and their checks, hub pinning."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import transformers
from support import TINY_SPECS, hub_snapshot, run_stage

from workflow_scripts.fetch_model import count_parameters, fetch
from workflow_scripts.models import load_adapter
from workflow_scripts.models.builtin_tokenizer import builtin_tokenizer
from workflow_scripts.models.store import (
    MANIFEST,
    WEIGHTS,
    ModelDirError,
    read_manifest,
    sha256_file,
)
from workflow_scripts.rehearsal.stand_ins import study_gptr2


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


COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def test_the_studys_gptr2_checkpoints_load_from_the_hub(tmp_path):
    """hf: offline, from huggingface_hub's cache: a gptr2-nano checkpoint in the study's form is
    pinned to its commit, stored as safetensors, and reads as the study read it
    (``hidden_states``, the last after ln_f)."""
    study = study_gptr2(tmp_path / "gptr")  # the rehearsal's stand-in of the study's form
    repo = "George-Ogden/gptr2-nano-with-momentum-with-weight-decay"
    hub_snapshot(tmp_path / "hub", repo, tmp_path / "gptr", COMMIT)
    spec = {"family": "gptr2", "source": f"hf:{repo}", "blocks": 2}
    done = run_stage("fetch_model", tmp_path / "hub", spec=json.dumps(spec), out=tmp_path / "m")
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(tmp_path / "m")
    assert manifest["revision"] == COMMIT and WEIGHTS in manifest["files"]
    assert manifest["parameters"] == sum(p.numel() for p in study.parameters())
    adapter, _ = load_adapter(tmp_path / "m", final_readout="final_norm")
    inputs = dict(adapter.tokenizer(["the old pilot found the map ."], return_tensors="pt"))
    with torch.no_grad():
        streams = adapter.streams(inputs)
        hidden = study(**inputs, output_hidden_states=True).hidden_states
        own = study(**inputs).logits
        torch.testing.assert_close(adapter.logits(inputs), own, rtol=1e-5, atol=1e-5)
    assert len(streams) == len(hidden) == 3
    for stream, reference in zip(streams, hidden):
        torch.testing.assert_close(stream, reference, rtol=1e-5, atol=1e-5)


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


def test_a_hub_model_neither_reachable_nor_cached_is_one_line(tmp_path):
    spec = {"family": "gpt2", "source": "hf:someone/not-cached", "blocks": 2}
    done = run_stage("fetch_model", tmp_path / "hub", spec=json.dumps(spec), out=tmp_path / "m")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "hf:someone/not-cached@main cannot be downloaded" in done.stderr
    assert not (tmp_path / "m").exists()


def test_a_hub_checkpoint_in_transformers_form_is_copied_as_it_is(tmp_path):
    """A decoder saved in several safetensors files (as a 70B checkpoint is) is stored byte for
    byte, with its index, and counted without its weights being read: fetch runs in far less
    memory than the model (a login node)."""
    tokenizer = builtin_tokenizer("gpt2")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "llama", max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path / "llama")
    shards = sorted(p.name for p in (tmp_path / "llama").glob("*.safetensors"))
    assert len(shards) > 2
    hub_snapshot(tmp_path / "hub", "org/llama", tmp_path / "llama", COMMIT)
    spec = {"family": "decoder", "source": "hf:org/llama", "blocks": 3}
    done = run_stage("fetch_model", tmp_path / "hub", spec=json.dumps(spec), out=tmp_path / "m")
    assert done.returncode == 0, done.stderr
    for name in [*shards, "model.safetensors.index.json", "config.json"]:
        assert (tmp_path / "m" / name).read_bytes() == (tmp_path / "llama" / name).read_bytes()
    manifest = read_manifest(tmp_path / "m")
    assert manifest["parameters"] == sum(p.numel() for p in model.parameters())
    adapter, _ = load_adapter(tmp_path / "m")
    inputs = dict(adapter.tokenizer(["the old pilot found the map ."], return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(adapter.logits(inputs), model(**inputs).logits)
