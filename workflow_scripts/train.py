"""train: a model trained from a run of the config, in the stored layout, with its metrics.

Run kinds:
  causal_lm                a GPT-2-style model (gpt2, or gptr2 with scalar-gain RMSNorm) built from
                           architecture settings, next-token loss on blocks of ``context`` tokens
                           of a token file (the tokenize rule's output);
  image_classification     a ResNet (BatchNorm or basis-independent RMSNorm over channels) built
                           from architecture settings, on an image dataset;
  sequence_classification  a stored text model (``base``) fine-tuned on sentence pairs, with a
                           new classification head.
Batches come through torch's DataLoader (workers: the job's threads less one), each a pure
function of (seed, step): epochs are seeded permutations without replacement, augmentation is
seeded per (seed, epoch, example) (see :mod:`workflow_scripts.loaders`), and the global RNG
(dropout) is reseeded every step, so a run resumed from its checkpoint continues exactly as if it
had not stopped, and the same config on the CPU gives identical weights. The optimizers (sgd,
adam, adamw, adafactor, muon; in the standard basis or a rotated one) are
:mod:`workflow_scripts.optimizers`'; the checkpoint holds all of their state.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from workflow_scripts import families, loaders, optimizers
from workflow_scripts.atomic import write_parquet, written
from workflow_scripts.batches import autocast, loader, pick_device
from workflow_scripts.data.store import DatasetError
from workflow_scripts.models import family_module, load_model, save_model
from workflow_scripts.models.store import MANIFEST, read_manifest, sha256_file
from workflow_scripts.snapshot import snapshot_folder
from workflow_scripts.stage import InputError
from workflow_scripts.stage_code import code_key

log = logging.getLogger("train")
KINDS = {"causal_lm": "text", "image_classification": "image", "sequence_classification": "pairs"}


class TrainingError(InputError):
    """A run that cannot go on (a diverging loss), named with its step."""


def build(spec: dict, base_dir: str | Path | None, tokenizer_dir: str | Path | None = None):
    """The model to train, its tokenizer (None for an image model) and its family."""
    kind, family = spec["kind"], families.run_family(spec)
    if family is not None:  # built from its architecture
        tokenizer = None
        if tokenizer_dir is not None:  # another model's tokenizer: a real vocabulary
            _, tokenizer = load_model(tokenizer_dir, read_manifest(tokenizer_dir)["family"])
        built = {"family": family, "arch": spec["arch"], "seed": spec["seed"], "head": kind}
        if "num_labels" in spec:
            built["num_labels"] = spec["num_labels"]
        model, tokenizer = family_module(family).init(built, tokenizer)
        return model, tokenizer, family
    family = read_manifest(base_dir)["family"]
    torch.manual_seed(spec["seed"])  # the new head's initialisation
    model, tokenizer = load_model(
        base_dir, family, head="sequence_classification", num_labels=spec["num_labels"]
    )
    return model, tokenizer, family


def training_examples(spec: dict, kind: str, data_path, tokenizer, preprocess):
    """How the run reads its examples: blocks of a token file, or rows of a stored dataset."""
    if kind == "text":
        if Path(data_path).suffix != ".npy":
            raise DatasetError(f"{data_path}: a language model trains on a token file (.npy)")
        return loaders.TokenExamples(data_path, spec["context"])
    if Path(data_path).suffix != ".parquet":
        raise DatasetError(f"{data_path}: a {spec['kind']} run reads a stored dataset (.parquet)")
    if kind == "pairs":  # each checks the file holds its kind
        return loaders.PairExamples(data_path, tokenizer, spec["max_tokens"])
    return loaders.ImageExamples(data_path, preprocess, spec["seed"])


def forward(model, kind: str, batch: dict[str, torch.Tensor]):
    """(loss, number of correct predictions, number of predictions)."""
    if kind == "image_classification":
        logits = model(batch["pixel_values"])
        labels = batch["labels"]
    elif kind == "causal_lm":
        ids = batch["input_ids"]  # whole blocks of text: no padding
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[
            :, :-1
        ]
        labels = batch["input_ids"][:, 1:].long()
    else:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits, labels = model(**inputs).logits, batch["labels"]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    return loss, int((logits.argmax(-1) == labels).sum()), labels.numel()


def evaluate(model, kind: str, batches, device, precision, preprocess) -> float:
    model.eval()
    correct = total = 0
    with torch.inference_mode(), autocast(device, precision):
        for batch in batches:
            _, c, t = forward(model, kind, on_device(batch, device, preprocess))
            correct, total = correct + c, total + t
    model.train()
    return correct / total


def on_device(batch: dict, device, preprocess) -> dict:
    """A batch on the device (copied without blocking from pinned memory), images normalised."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return loaders.normalise(batch, preprocess)


def make_optimizer(model, settings: dict):
    """One torch optimizer (sgd, adam, adamw, adafactor) over all of ``model``'s parameters in
    the standard basis: the benchmarks' step loop. A run's optimizers (Muon's two, a rotated
    basis) are :func:`workflow_scripts.optimizers.build`'s."""
    return optimizers.single_optimizer(model.parameters(), settings)


def learning_rate(step: int, spec: dict) -> float:
    """Linear warm-up, then constant or cosine decay to zero; a factor of the base rate."""
    warmup = spec["warmup_steps"]
    if step < warmup:
        return (step + 1) / warmup
    if spec["schedule"] == "constant":
        return 1.0
    progress = (step - warmup) / max(1, spec["steps"] - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def fingerprint(spec: dict, family: str, data_path, *model_dirs) -> str:
    """What a checkpoint must match to be resumed: the run, its inputs and the training code."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    record = families.get(family)
    digest.update(code_key("workflow_scripts.train", record.module, record.record).encode())
    digest.update(sha256_file(data_path).encode())
    for directory in model_dirs:  # the base of a fine-tune, the model lending its tokenizer
        if directory is not None:
            digest.update(sha256_file(Path(directory, MANIFEST)).encode())
    return digest.hexdigest()


def train(
    name: str,
    spec: dict,
    data_path,
    out_model,
    metrics_path,
    plot_path,
    checkpoint_path,
    base_dir=None,
    tokenizer_dir=None,
    workers: int = 0,
    snapshots_path=None,
) -> pd.DataFrame:
    """Train run ``name`` on ``data_path`` (a token file for a language model, else a stored
    dataset) with ``workers`` loader processes; write the model, metrics and loss curve."""
    kind = KINDS[spec["kind"]]
    # the arithmetic's threads come from the run, not the job's cores: float sums split over
    # another number of threads round differently, and the cache key holds the run's settings
    torch.set_num_threads(spec.get("cpu_threads", 1))
    model, tokenizer, family = build(spec, base_dir, tokenizer_dir)
    preprocess = model.config["preprocess"] if kind == "image" else None
    examples = training_examples(spec, kind, data_path, tokenizer, preprocess)
    if kind != "text":
        labels = examples.labels()
        if int(labels.max()) >= spec["num_labels"]:
            bad = int(np.argmax(labels >= spec["num_labels"]))
            raise DatasetError(
                f"run {name}: labels go up to {int(labels.max())} (first at row {bad}), but "
                f"the model has {spec['num_labels']} classes"
            )
        del labels
    row_group_rows = getattr(examples, "row_group_rows", 1)
    held_out = loaders.held_out_rows(
        examples.rows, spec["eval_fraction"], spec["seed"], row_group_rows
    )
    order = loaders.EpochOrder(
        examples.rows,
        held_out,
        spec["seed"],
        examples.group_starts,
        loaders.window_groups(spec["batch_size"], row_group_rows),
    )
    steps, total = loaders.steps_for(spec, len(order))
    spec = {**spec, "steps": steps} if "epochs" in spec else spec
    wanted = set(spec.get("snapshots", []))
    if wanted and max(wanted) >= steps:
        raise TrainingError(
            f"run {name}: snapshot step {max(wanted)} is not before its last step {steps}"
        )
    device = pick_device(spec["device"])
    precision = spec.get("mixed_precision")
    pin = device.type == "cuda"
    model.to(device).train()
    # the run's optimizers (Muon's two), their schedules and the basis they work in, as one
    optimizer = optimizers.build(
        model, spec, families.get(family), lambda s: learning_rate(s, spec)
    )
    # float16 gradients underflow without loss scaling; on the CPU or in bfloat16 it is a no-op
    scaler = torch.amp.GradScaler(
        device.type, enabled=precision == "float16" and device.type == "cuda"
    )
    records, start = [], 0
    key = fingerprint(spec, family, data_path, base_dir, tokenizer_dir)
    checkpoint_path = Path(checkpoint_path)
    if checkpoint_path.exists():
        try:  # tensors and plain values only: a checkpoint never runs code when read
            state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        except pickle.UnpicklingError as error:
            raise TrainingError(
                f"{checkpoint_path} is not a checkpoint this workflow wrote (it holds objects "
                f"other than tensors and plain values: {str(error).splitlines()[0]}); delete it "
                "to train from the start"
            ) from None
        if state["fingerprint"] == key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])  # with the schedules and shadows
            scaler.load_state_dict(state["scaler"])
            records, start = state["records"], state["step"]
            log.info("resuming %s from its checkpoint at step %d", name, start)
        else:
            log.info("ignoring a checkpoint of another configuration: %s", checkpoint_path)
    # snapshots kept so far, beside the checkpoint until the run ends (a resumed run keeps those
    # of the steps before its checkpoint)
    partial = Path(f"{snapshots_path}.partial") if snapshots_path is not None else None
    if partial is not None and start == 0:
        shutil.rmtree(partial, ignore_errors=True)
    batches = loader(
        loaders.StepBatches(examples, order, spec["batch_size"], start, steps, total),
        workers,
        pin,
    )
    held_out_batches = loader(
        loaders.FixedBatches(examples, held_out, spec["batch_size"]), workers, pin, persistent=True
    )
    progress = tqdm(
        total=steps, initial=start, desc=f"train {name}", file=sys.stderr, mininterval=5
    )
    waited = busy = 0.0
    clock = time.perf_counter()
    for step, batch in zip(range(start, steps), batches):
        fetched = time.perf_counter()
        waited += fetched - clock
        batch = on_device(batch, device, preprocess)
        torch.manual_seed(spec["seed"] * 1_000_003 + step)  # dropout, reproducible per step
        with autocast(device, precision):
            loss, _, _ = forward(model, spec["kind"], batch)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"run {name}: the loss is {loss.item()} at step {step}; the run "
                "diverged (lower the learning rate or clip gradients)"
            )
        scaler.scale(loss).backward()
        optimizer.unscale_(scaler)  # each optimizer's gradients, in its basis
        grad_norm = optimizer.clip_grad_norm_(spec.get("clip_grad_norm") or math.inf)
        record = {
            "step": step,
            "loss": loss.item(),
            "learning_rate": optimizer.learning_rate(),
            "grad_norm": grad_norm,
            "eval_accuracy": math.nan,
        }
        optimizer.step(scaler)  # each optimizer through the scaler, then the schedules
        scaler.update()
        optimizer.zero_grad()
        if (step + 1) % spec["eval_every"] == 0 or step + 1 == spec["steps"]:
            record["eval_accuracy"] = evaluate(
                model, spec["kind"], held_out_batches, device, precision, preprocess
            )
            progress.set_postfix(
                loss=f"{record['loss']:.3f}", accuracy=f"{record['eval_accuracy']:.3f}"
            )
        records.append(record)
        if step + 1 in wanted and partial is not None:
            _save_snapshot(partial, step + 1, name, model, tokenizer, family, spec, optimizer)
        if (step + 1) % spec["checkpoint_every"] == 0 and step + 1 < spec["steps"]:
            _save_checkpoint(checkpoint_path, key, step + 1, model, optimizer, scaler, records)
        progress.update()
        clock = time.perf_counter()
        busy += clock - fetched
    progress.close()
    if steps > start:
        log.info(
            "waited for data %.1f%% of the time (%.1f s of %.1f s; %d loader workers)",
            100 * waited / max(waited + busy, 1e-9),
            waited,
            waited + busy,
            workers,
        )
    model.eval().cpu()
    save_model(
        model,
        tokenizer,
        family,
        out_model,
        source=f"train:{name}",
        training=spec,
        optimizer_basis=optimizer.basis_record(),  # to measure the stream in its basis
    )
    if partial is not None:
        _place_snapshots(partial, Path(snapshots_path), wanted)
    metrics = pd.DataFrame(records)
    write_parquet(metrics, metrics_path)
    plot_losses(metrics, name, plot_path)
    checkpoint_path.unlink(missing_ok=True)
    return metrics


def _save_snapshot(folder: Path, step: int, name, model, tokenizer, family, spec, optimizer):
    """The model after ``step`` steps, stored as a model directory (``snapshot.snapshot_folder``;
    a copy on the CPU: the training goes on undisturbed)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_model(
        copy.deepcopy(model).eval().cpu(),
        tokenizer,
        family,
        snapshot_folder(folder, step),
        source=f"train:{name}@{step}",
        training=spec,
        training_step=step,
        optimizer_basis=optimizer.basis_record(),
    )


def _place_snapshots(partial: Path, out: Path, wanted: set[int]) -> None:
    """Move the snapshots kept into the run's output folder (an empty one where it keeps none),
    all of them or none."""
    missing = [s for s in sorted(wanted) if not snapshot_folder(partial, s).is_dir()]
    if missing:
        raise TrainingError(f"{partial}: the snapshots of steps {missing} are missing")
    partial.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)


def _save_checkpoint(path: Path, key, step, model, optimizer, scaler, records) -> None:
    with written(path) as tmp:
        torch.save(
            {
                "fingerprint": key,
                "step": step,
                "model": model.state_dict(),
                # every optimizer's state, its schedule's, and the rotated basis's shadows
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),  # float16's loss scale, so a resume is exact
                "records": records,
            },
            tmp,
        )


def plot_losses(metrics: pd.DataFrame, name: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(6, 3.5), layout="constrained")
    loss_axis.plot(metrics["step"], metrics["loss"], color="#0072B2", linewidth=1, label="loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss")
    evaluated = metrics.dropna(subset=["eval_accuracy"])
    accuracy_axis = loss_axis.twinx()
    accuracy_axis.plot(
        evaluated["step"],
        evaluated["eval_accuracy"],
        "o-",
        color="#D55E00",
        markersize=3,
        label="held-out accuracy",
    )
    accuracy_axis.set_ylabel("held-out accuracy")
    accuracy_axis.set_ylim(0, 1)
    handles = loss_axis.get_lines() + accuracy_axis.get_lines()
    loss_axis.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    loss_axis.set_title(f"training run {name}")
    try:
        with written(path) as tmp:
            figure.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    finally:
        plt.close(figure)


def run(
    model: str,
    spec: dict,
    data: str,
    base: str | None,
    tokenizer: str | None,
    checkpoint: str,
    metrics: str,
    plot: str,
    out: str,
    snapshots: str | None = None,
    threads: int = 1,
) -> None:
    """The train stage: run ``model`` (the run of that name) and write its model directory
    ``out``, its metrics and loss curve, and the models of its snapshot steps into
    ``snapshots``; it resumes from ``checkpoint`` where one matches."""
    frame = train(
        model,
        spec,
        data,
        out,
        metrics,
        plot,
        checkpoint,
        base,
        tokenizer,
        workers=max(0, threads - 1),  # the main process keeps one core
        snapshots_path=snapshots,
    )
    final = frame["eval_accuracy"].dropna()
    log.info(
        "run %s: final loss %.4f, held-out accuracy %.3f",
        model,
        frame["loss"].iloc[-1],
        final.iloc[-1] if len(final) else float("nan"),
    )
