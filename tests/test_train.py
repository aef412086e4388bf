"""Training runs: learning, determinism, resuming after a real kill, divergence, the stored
layout, and the grid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from support import REPO

from workflow_scripts.config import ConfigError, validate
from workflow_scripts.data import builtin, store
from workflow_scripts.models import load_adapter
from workflow_scripts.models.store import read_manifest
from workflow_scripts.plan import resolve
from workflow_scripts.train import TrainingError, train

COMMON = {
    "seed": 0,
    "eval_fraction": 0.1,
    "eval_every": 20,
    "checkpoint_every": 10,
    "device": "cpu",
    "warmup_steps": 5,
    "schedule": "cosine",
    "clip_grad_norm": 1.0,
    "batch_size": 16,
    "max_tokens": 64,
    "context": 32,
    "mixed_precision": None,
}
LM = {
    **COMMON,
    "kind": "causal_lm",
    "family": "gptr2",
    "arch": {"layers": 2, "width": 32, "heads": 2, "context": 64},
    "optimizer": {"name": "adam", "lr": 0.003},
    "steps": 60,
}
RESNET = {
    **COMMON,
    "kind": "image_classification",
    "num_labels": 10,
    "arch": {
        "block": "basic",
        "layers": [1, 1],
        "widths": [16, 32],
        "stem": "cifar",
        "norm": "rms",
    },
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "steps": 150,
    "eval_every": 50,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    paths = {}
    for name, kind, rows in (
        ("corpus", "text", 300),
        ("shapes", "image", 400),
        ("pairs", "pairs", 400),
    ):
        paths[name] = root / f"{name}.parquet"
        store.write(builtin.generate(name, rows, 1), paths[name], kind, builtin.label_names(name))
    return paths


def run(tmp_path, name, spec, data_path, base=None):
    out = tmp_path / name
    metrics = train(
        name,
        spec,
        data_path,
        out / "model",
        out / "metrics.parquet",
        out / "loss.png",
        out / "checkpoint.pt",
        base,
    )
    return out, metrics


def test_language_model_learns_and_is_stored(tmp_path, data):
    out, metrics = run(tmp_path, "lm", LM, data["corpus"])
    assert list(metrics.columns) == ["step", "loss", "learning_rate", "grad_norm", "eval_accuracy"]
    assert metrics["step"].tolist() == list(range(60))
    assert metrics["loss"].iloc[-10:].mean() < 0.75 * metrics["loss"].iloc[:5].mean()
    assert metrics["eval_accuracy"].dropna().iloc[-1] > 0.2  # chance: 1 / ~120 words
    manifest = read_manifest(out / "model")
    assert manifest["source"] == "train:lm" and manifest["family"] == "gptr2"
    adapter, _ = load_adapter(out / "model")
    assert len(adapter.readouts) == 3 and adapter.head == "causal_lm"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "checkpoint.pt").exists()  # removed once the run is done


def test_resnet_with_rms_norm_learns(tmp_path, data):
    out, metrics = run(tmp_path, "resnet", RESNET, data["shapes"])
    assert metrics["eval_accuracy"].dropna().iloc[-1] > 0.25  # chance 0.1
    adapter, manifest = load_adapter(out / "model")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in adapter.model.modules())
    assert manifest["training"]["optimizer"]["name"] == "sgd"


def test_fine_tune_keeps_the_base_and_learns_the_pairs(tmp_path, data, model_dirs):
    spec = {
        **COMMON,
        "kind": "sequence_classification",
        "num_labels": 3,
        "steps": 100,
        "eval_every": 50,
        "optimizer": {"name": "adamw", "lr": 0.002},
    }
    out, metrics = run(tmp_path, "ft", spec, data["pairs"], model_dirs["roberta"])
    assert metrics["eval_accuracy"].dropna().iloc[-1] > 0.6  # chance 1/3
    adapter, _ = load_adapter(out / "model")
    assert adapter.head == "sequence_classification" and adapter.num_labels == 3


def test_same_config_gives_identical_weights(tmp_path, data):
    a, _ = run(tmp_path / "a", "lm", {**LM, "steps": 15}, data["corpus"])
    b, _ = run(tmp_path / "b", "lm", {**LM, "steps": 15}, data["corpus"])
    assert read_manifest(a / "model")["files"] == read_manifest(b / "model")["files"]
    c, _ = run(tmp_path / "c", "lm", {**LM, "steps": 15, "seed": 1}, data["corpus"])
    assert read_manifest(c / "model")["files"] != read_manifest(a / "model")["files"]


def test_diverging_run_stops_naming_the_step(tmp_path, data):
    spec = {
        **RESNET,
        "optimizer": {"name": "sgd", "lr": 1e38, "momentum": 0.9},
        "clip_grad_norm": None,
        "warmup_steps": 0,
    }
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step \d+"):
        run(tmp_path, "diverge", spec, data["shapes"])
    assert not (tmp_path / "diverge" / "model").exists()


def test_killed_run_resumes_from_its_checkpoint(tmp_path, data):
    spec = {**LM, "steps": 80, "checkpoint_every": 10}
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "workflow_scripts.train",
        "--name",
        "lm",
        "--spec",
        json.dumps(spec),
        "--data",
        str(data["corpus"]),
        "--checkpoint",
        str(out / "checkpoint.pt"),
        "--metrics",
        str(out / "metrics.parquet"),
        "--plot",
        str(out / "loss.png"),
        "--out",
        str(out / "model"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.05)
    assert (out / "checkpoint.pt").exists(), "no checkpoint was written"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "model").exists()
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < saved < 80
    resumed = train(
        "lm",
        spec,
        data["corpus"],
        out / "model",
        out / "metrics.parquet",
        out / "loss.png",
        out / "checkpoint.pt",
    )
    assert resumed["step"].tolist() == list(range(80))
    straight, _ = run(tmp_path / "straight", "lm", spec, data["corpus"])
    # resuming changes nothing: the same weights and the same losses as an unbroken run
    assert read_manifest(out / "model")["files"] == read_manifest(straight / "model")["files"]
    pd.testing.assert_frame_equal(resumed, pd.read_parquet(straight / "metrics.parquet"))


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path, data):
    spec = {**LM, "steps": 30, "checkpoint_every": 10}
    out = tmp_path / "other"
    train(
        "lm",
        spec,
        data["corpus"],
        out / "m1",
        out / "metrics.parquet",
        out / "loss.png",
        out / "keep.pt",
    )
    torch.save(
        {
            "fingerprint": "another",
            "step": 25,
            "model": {},
            "optimizer": {},
            "schedule": {},
            "records": [],
        },
        out / "checkpoint.pt",
    )
    metrics = train(
        "lm",
        spec,
        data["corpus"],
        out / "m2",
        out / "metrics.parquet",
        out / "loss.png",
        out / "checkpoint.pt",
    )
    assert metrics["step"].tolist() == list(range(30))


def test_grid_expands_into_runs_and_models(default_config):
    study = resolve(default_config)
    runs = study.runs
    assert {"gptr2-nano-sgd", "gptr2-nano-adam", "resnet-rms-sgd", "roberta-pairs"} <= set(runs)
    assert "gptr2-nano" not in runs
    assert runs["gptr2-nano-sgd"].settings["optimizer"] == {
        "name": "sgd",
        "lr": 0.3,
        "momentum": 0.9,
    }
    assert runs["gptr2-nano-adam"].settings["optimizer"]["name"] == "adam"
    model = study.models["gptr2-nano-sgd"]
    assert model.source == "train:gptr2-nano-sgd" and model.family.name == "gptr2"
    assert model.blocks == 4
    assert study.models["roberta-pairs"].family.name == "roberta"
    assert study.models["roberta-pairs"].blocks == 4


def test_two_axis_grid_and_bad_settings_after_the_grid(default_config):
    run = default_config["training"]["runs"]["gptr2-nano"]
    run["grid"]["decay"] = {
        "wd0": {"optimizer": {"weight_decay": 0}},
        "wd1": {"optimizer": {"weight_decay": 0.1}},
    }
    for analysis in (
        default_config["analyses"]
        + default_config["ablation"]["analyses"]
        + list(default_config["figures"]["groups"].values())
    ):
        analysis["models"] = [m for m in analysis["models"] if not m.startswith("gptr2-nano")]
    default_config["figures"]["top_examples"] = [
        t
        for t in default_config["figures"]["top_examples"]
        if not t["model"].startswith("gptr2-nano")
    ]
    runs = resolve(default_config).runs
    assert {
        "gptr2-nano-sgd-wd0",
        "gptr2-nano-sgd-wd1",
        "gptr2-nano-adam-wd0",
        "gptr2-nano-adam-wd1",
    } <= set(runs)
    assert runs["gptr2-nano-sgd-wd1"].settings["optimizer"] == {
        "name": "sgd",
        "lr": 0.3,
        "momentum": 0.9,
        "weight_decay": 0.1,
    }
    run["grid"]["decay"]["wd1"] = {"optimizer": {"weight_decay": "lots"}}
    with pytest.raises(
        ConfigError, match="training.runs.gptr2-nano-sgd-wd1.optimizer.weight_decay"
    ):
        validate(default_config)


def test_run_on_the_wrong_kind_of_dataset(default_config):
    default_config["training"]["runs"]["resnet-rms-sgd"]["dataset"] = "corpus"
    with pytest.raises(ConfigError, match="image_classification run needs an? image dataset"):
        validate(default_config)


def test_train_source_must_name_a_run(default_config):
    default_config["models"]["mystery"] = {"family": "gpt2", "source": "train:nothing"}
    with pytest.raises(ConfigError, match="training run 'nothing' is not defined"):
        validate(default_config)


def test_epochs_set_the_number_of_steps(tmp_path, data):
    spec = {k: v for k, v in LM.items() if k != "steps"} | {"epochs": 0.5, "batch_size": 8}
    _, metrics = run(tmp_path, "epochs", spec, data["corpus"])
    from workflow_scripts.models.builtin_tokenizer import builtin_tokenizer

    texts = store.read(data["corpus"])[0]["text"]
    tokens = sum(len(ids) + 1 for ids in builtin_tokenizer("gpt2")(list(texts))["input_ids"])
    blocks = tokens // 32
    n_train = blocks - round(blocks * 0.1)
    assert metrics["step"].tolist() == list(range(-(-n_train // 16)))  # ceil(0.5 * n / 8)


def test_steps_or_epochs(default_config):
    default_config["training"]["runs"]["roberta-pairs"]["epochs"] = 2
    with pytest.raises(ConfigError, match="either 'steps' or 'epochs'"):
        validate(default_config)


def test_a_fine_tune_of_another_run(default_config):
    runs = default_config["training"]["runs"]
    runs["lm-pairs"] = {
        "kind": "sequence_classification",
        "base": "gptr2-nano-adam",
        "num_labels": 3,
        "dataset": "pairs-train",
        "steps": 10,
        "optimizer": {"name": "adamw", "lr": 0.001},
    }
    model = resolve(default_config).models["lm-pairs"]
    assert model.family.name == "gptr2" and model.blocks == 4
    assert model.head == "sequence_classification"


def test_token_blocks_are_the_same_in_chunks_as_in_one_pass(data):
    from workflow_scripts.models.builtin_tokenizer import builtin_tokenizer
    from workflow_scripts.train import _token_blocks

    tokenizer = builtin_tokenizer("gpt2")
    texts = pd.read_parquet(data["corpus"])["text"].to_numpy()[:50]
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    expected = torch.tensor(stream[: len(stream) // 16 * 16]).view(-1, 16)
    for chunk in (7, 10_000):
        blocks = _token_blocks(tokenizer, texts, 16, chunk=chunk)
        assert blocks.dtype == torch.int32
        assert torch.equal(blocks.long(), expected)


def test_language_model_with_another_models_tokenizer(tmp_path, data, model_dirs):
    out = tmp_path / "lm"
    train(
        "lm",
        {**LM, "steps": 5},
        data["corpus"],
        out / "model",
        out / "metrics.parquet",
        out / "loss.png",
        out / "checkpoint.pt",
        tokenizer_dir=model_dirs["roberta"],
    )
    adapter, _ = load_adapter(out / "model")
    lender, _ = load_adapter(model_dirs["roberta"])
    assert adapter.tokenizer.get_vocab() == lender.tokenizer.get_vocab()
    assert (
        adapter.tokenizer.get_vocab() != load_adapter(model_dirs["gpt2"])[0].tokenizer.get_vocab()
    )


def test_a_tokenizer_must_come_from_a_text_model(default_config):
    runs = default_config["training"]["runs"]
    runs["gptr2-nano"]["tokenizer"] = "resnet-init"
    with pytest.raises(ConfigError, match="tokenizer: 'resnet-init' is not a defined text model"):
        validate(default_config)
    runs["gptr2-nano"]["tokenizer"] = "gpt2-init"
    validate(default_config)


def test_a_decoder_cannot_be_fine_tuned_for_pairs(default_config):
    default_config["models"]["llama-init"] = {
        "family": "decoder",
        "source": "init:",
        "arch": {"layers": 2, "width": 32, "heads": 2},
    }
    default_config["training"]["runs"]["roberta-pairs"]["base"] = "llama-init"
    with pytest.raises(ConfigError, match="is a decoder, which has a causal_lm head only"):
        validate(default_config)
