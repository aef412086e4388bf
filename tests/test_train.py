"""Training runs: learning, determinism, resuming after a real kill, divergence, the stored
layout, and the grid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support import REPO

from workflow_scripts import families
from workflow_scripts.config import ConfigError, validate
from workflow_scripts.data import builtin, store
from workflow_scripts.models import load_adapter
from workflow_scripts.models.store import read_manifest
from workflow_scripts.plan import resolve
from workflow_scripts.tokenize import tokenize
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
    paths["tokens"] = root / "corpus.npy"  # the built-in tokenizer in gptr2's style
    tokenize(paths["corpus"], paths["tokens"], builtin_style=families.get("gptr2").tokenizer)
    return paths


def run(tmp_path, name, spec, data_path, base=None, workers=0):
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
        workers=workers,
        snapshots_path=out / "snapshots",
    )
    return out, metrics


def test_language_model_learns_and_is_stored(tmp_path, data):
    out, metrics = run(tmp_path, "lm", LM, data["tokens"])
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
    a, _ = run(tmp_path / "a", "lm", {**LM, "steps": 15}, data["tokens"])
    b, _ = run(tmp_path / "b", "lm", {**LM, "steps": 15}, data["tokens"])
    assert read_manifest(a / "model")["files"] == read_manifest(b / "model")["files"]
    c, _ = run(tmp_path / "c", "lm", {**LM, "steps": 15, "seed": 1}, data["tokens"])
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


# every optimizer, and Adam in the rotated basis (its shadow parameters in the checkpoint)
RESUMED = {
    "sgd": {"name": "sgd", "lr": 0.3, "momentum": 0.9, "weight_decay": 0.01},
    "adam": {"name": "adam", "lr": 0.003},
    "adamw": {"name": "adamw", "lr": 0.003, "weight_decay": 0.1},
    "muon": {"name": "muon", "lr": 0.02, "adamw_lr": 0.003, "weight_decay": 0.01},
    "adafactor": {"name": "adafactor", "lr": 0.1},
    "rotated-adam": {"name": "adam", "lr": 0.003, "basis": "rotated", "basis_seed": 5},
}


@pytest.mark.parametrize("optimizer", list(RESUMED))
def test_killed_run_resumes_from_its_checkpoint(tmp_path, data, optimizer):
    # snapshots before the first checkpoint and after it: a resume keeps the earlier ones
    spec = {**LM, "optimizer": RESUMED[optimizer], "steps": 40, "checkpoint_every": 5}
    spec["snapshots"] = [3, 20, 35]
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "workflow_scripts.stage", "train", "model=lm"]
    command += [f"spec={json.dumps(spec)}", f"data={data['tokens']}", "base=", "tokenizer="]
    command += [f"checkpoint={out / 'checkpoint.pt'}", f"metrics={out / 'metrics.parquet'}"]
    command += [f"plot={out / 'loss.png'}", f"out={out / 'model'}"]
    command += [f"snapshots={out / 'snapshots'}", "--threads", "3"]
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
    assert 0 < saved < 40
    resumed = train(
        "lm",
        spec,
        data["tokens"],
        out / "model",
        out / "metrics.parquet",
        out / "loss.png",
        out / "checkpoint.pt",
        workers=1,
        snapshots_path=out / "snapshots",
    )
    assert resumed["step"].tolist() == list(range(40))
    straight, _ = run(tmp_path / "straight", "lm", spec, data["tokens"])
    # resuming changes nothing: the same weights and the same losses as an unbroken run
    manifest = read_manifest(out / "model")
    assert manifest["files"] == read_manifest(straight / "model")["files"]
    pd.testing.assert_frame_equal(resumed, pd.read_parquet(straight / "metrics.parquet"))
    # and the same snapshots, each of the model after its step
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-20", "step-3", "step-35"]
    for step in (3, 20, 35):
        kept = read_manifest(out / "snapshots" / f"step-{step}")
        assert kept["training_step"] == step and kept["source"] == f"train:lm@{step}"
        assert kept["files"] == read_manifest(straight / "snapshots" / f"step-{step}")["files"]
    assert kept["files"] != manifest["files"]  # the model moved on after its last snapshot
    assert not Path(f"{out / 'snapshots'}.partial").exists()
    # the basis the optimizer worked in, to measure the stream in it
    basis = manifest["optimizer_basis"]
    assert basis["basis"] == RESUMED[optimizer].get("basis", "standard")
    if basis["basis"] == "rotated":
        assert (basis["seed"], basis["width"]) == (5, LM["arch"]["width"])


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path, data):
    spec = {**LM, "steps": 30, "checkpoint_every": 10}
    out = tmp_path / "other"
    train(
        "lm",
        spec,
        data["tokens"],
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
        data["tokens"],
        out / "m2",
        out / "metrics.parquet",
        out / "loss.png",
        out / "checkpoint.pt",
    )
    assert metrics["step"].tolist() == list(range(30))


class Payload:
    """What a checkpoint someone else wrote could hold: an object whose unpickling runs code."""

    def __reduce__(self):
        return (Path("/tmp/ran-from-a-checkpoint").touch, ())


def test_a_checkpoint_that_holds_objects_is_refused_not_run(tmp_path, data):
    spec = {**LM, "steps": 30, "checkpoint_every": 10}
    out = tmp_path / "hostile"
    out.mkdir()
    Path("/tmp/ran-from-a-checkpoint").unlink(missing_ok=True)
    torch.save({"fingerprint": "x", "payload": Payload()}, out / "checkpoint.pt")
    with pytest.raises(TrainingError, match="checkpoint.pt is not a checkpoint this workflow"):
        train(
            "lm",
            spec,
            data["tokens"],
            out / "m",
            out / "metrics.parquet",
            out / "loss.png",
            out / "checkpoint.pt",
        )
    assert not Path("/tmp/ran-from-a-checkpoint").exists()


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
    assert str(model.source) == "train:gptr2-nano-sgd" and model.family.name == "gptr2"
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
    _, metrics = run(tmp_path, "epochs", spec, data["tokens"])
    from workflow_scripts.models.builtin_tokenizer import builtin_tokenizer

    texts = store.read(data["corpus"])[0]["text"]
    tokens = sum(len(ids) + 1 for ids in builtin_tokenizer("gpt2")(list(texts))["input_ids"])
    blocks = tokens // 32
    n_train = blocks - round(blocks * 0.1)
    assert metrics["step"].tolist() == list(range(-(-round(0.5 * n_train) // 8)))


def test_an_epoch_sees_every_training_example_once_in_a_seeded_order():
    from workflow_scripts import loaders

    starts = np.array([0, 10, 20, 30, 40, 47])  # five row groups
    held = loaders.held_out_rows(47, 0.1, 3, 10)
    assert len(held) == 5 and len(np.unique(held)) == 5
    order = loaders.EpochOrder(47, held, 3, starts, window_groups=2)
    steps, total = loaders.steps_for({"epochs": 2, "batch_size": 8}, len(order))
    assert (steps, total) == (11, 84)
    seen = [order.positions(step, 8, total) for step in range(steps)]
    flat = np.concatenate([p for p, _ in seen])
    epochs = np.concatenate([e for _, e in seen])
    assert len(flat) == 84 and len(seen[-1][0]) == 4  # the last batch is short
    for epoch in (0, 1):  # every training example once per epoch, none held out
        assert sorted(flat[epochs == epoch]) == sorted(set(range(47)) - set(held))
    assert not np.array_equal(flat[epochs == 0], flat[epochs == 1])  # a new order each epoch
    # block shuffled: each window of two row groups is contiguous in the order
    group = np.searchsorted(starts, flat[epochs == 0], side="right") - 1
    changes = np.flatnonzero(np.diff(group) != 0)
    assert (
        len({frozenset(group[a:b]) for a, b in zip([0, *changes + 1], [*changes + 1, 42])}) <= 3 * 2
    )
    again = loaders.EpochOrder(47, held, 3, starts, window_groups=2)
    assert np.array_equal(again.positions(5, 8, total)[0], seen[5][0])


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


@pytest.mark.parametrize("workers", [1, 2])
def test_token_file_is_the_texts_with_separators(tmp_path, data, workers, monkeypatch):
    from workflow_scripts.models.builtin_tokenizer import builtin_tokenizer

    monkeypatch.setitem(store.ROW_GROUP_ROWS, "text", 7)  # several row groups
    store.write(builtin.generate("corpus", 50, 2), tmp_path / "c.parquet", "text", None)
    total = tokenize(
        tmp_path / "c.parquet", tmp_path / "c.npy", builtin_style="gpt2", workers=workers
    )
    tokenizer = builtin_tokenizer("gpt2")
    stream = []
    for text in store.read(tmp_path / "c.parquet")[0]["text"]:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    tokens = np.load(tmp_path / "c.npy", mmap_mode="r")
    assert tokens.dtype == np.uint16 and total == len(stream)
    assert tokens.tolist() == stream


def test_language_model_with_another_models_tokenizer(tmp_path, data, model_dirs):
    out = tmp_path / "lm"
    tokens = tmp_path / "roberta-tokens.npy"
    tokenize(data["corpus"], tokens, model_dir=model_dirs["roberta"])
    train(
        "lm",
        {**LM, "steps": 5},
        tokens,
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


def test_imagenet_style_batches_are_augmented_and_the_same_with_workers(tmp_path, monkeypatch):
    import io

    from PIL import Image

    from workflow_scripts import loaders
    from workflow_scripts.batches import loader
    from workflow_scripts.models.resnet import imagenet_preprocess

    monkeypatch.setitem(store.ROW_GROUP_ROWS, "image", 8)
    rng = np.random.default_rng(0)
    images = []
    for _ in range(40):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    frame = pd.DataFrame({"example_id": range(40), "image": images, "label": [0, 1] * 20})
    store.write(frame, tmp_path / "jpegs.parquet", "image", ["a", "b"])
    examples = loaders.ImageExamples(tmp_path / "jpegs.parquet", imagenet_preprocess(40, 32), 7)
    held = loaders.held_out_rows(40, 0.1, 0, examples.row_group_rows)
    order = loaders.EpochOrder(40, held, 0, examples.group_starts, 2)

    def batches(workers):
        steps = loaders.StepBatches(examples, order, 12, 0, 6)
        return list(loader(steps, workers, pin_memory=False))

    alone, with_workers = batches(0), batches(2)
    for a, b in zip(alone, with_workers):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["labels"], b["labels"])
    assert alone[0]["pixel_values"].shape == (12, 3, 32, 32)
    assert alone[0]["pixel_values"].dtype == torch.uint8  # normalised on the device
    # the same example in two epochs gets two different crops
    first, _ = order.positions(0, 12)
    again = [
        (s, i)
        for s in range(3, 6)
        for i, p in enumerate(order.positions(s, 12)[0])
        if p == first[0]
    ]
    step, index = again[0]
    assert not torch.equal(alone[0]["pixel_values"][0], alone[step]["pixel_values"][index])
    held_out = list(loader(loaders.FixedBatches(examples, held, 12), 0, False))
    centre = held_out[0]["pixel_values"][0]
    assert torch.equal(centre, loaders.FixedBatches(examples, held, 12)[0]["pixel_values"][0])
    normalised = loaders.normalise(
        {"pixel_values": held_out[0]["pixel_values"]}, examples.preprocess
    )
    assert normalised["pixel_values"].dtype == torch.float32


def test_the_jobs_cores_do_not_change_the_weights(tmp_path, data):
    """The job's cores set loader workers only; the arithmetic's threads are a setting of the
    run, so a shared cache serves the same weights whoever computed them."""
    from workflow_scripts.train import run

    spec = {**RESNET, "steps": 12, "batch_size": 32}
    files = []
    for threads in (1, 3):
        out = tmp_path / f"t{threads}"
        run(
            model="r",
            spec=spec,
            data=str(data["shapes"]),
            base=None,
            tokenizer=None,
            checkpoint=str(out / "c.pt"),
            metrics=str(out / "m.parquet"),
            plot=str(out / "l.png"),
            out=str(out / "model"),
            threads=threads,
        )
        files.append(read_manifest(out / "model")["files"])
    assert files[0] == files[1]
