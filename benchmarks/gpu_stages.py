"""The stages on a GPU: do their CUDA paths run and match the CPU, and how fast are they?

Two parts, in one run:

1. Checks (small random-initialised models, the real stage functions): the stages of
   ``workflow_scripts.extract``, ``workflow_scripts.ablate`` and ``workflow_scripts.train`` are
   called with ``device: <--device>`` and again with ``device: cpu``, on built-in data:

   * extraction (gpt2, gptr2, bert, a basic BatchNorm ResNet, a bottleneck RMSNorm ResNet),
     stored as float32 so storage rounding hides nothing, with ``autocast`` null, float16 and
     bfloat16: every read-out must equal the CPU's within a tolerance relative to the layer's
     RMS (max |gpu - cpu| / rms(cpu) <= 5e-3 in float32 -- cuDNN convolutions use TF32 by
     default --, 3e-2 under float16 autocast, 1e-1 under bfloat16); the row index arrays must be
     identical;
   * ablation (gpt2 logit lens on the corpus, bert on pairs, both ResNets on shapes) with
     ``autocast`` null, float16, bfloat16: every accuracy must be within 0.02 (float32) or 0.05
     (autocast) of the CPU's (argmax ties of random-initialised models may flip);
   * training (a gptr2 language model on the corpus, an RMSNorm ResNet on shapes) with
     ``mixed_precision`` null, float16 (autocast + GradScaler) and bfloat16: every loss finite,
     the mean of the last 10 losses below 0.8x (LM) / 0.9x (ResNet) the mean of the first 5,
     and the first step's loss (same weights, same batch) near the CPU's.

2. Throughput on full-size random-initialised models, float32 and under float16/bfloat16
   autocast (times per batch around ``torch.cuda.synchronize()``, medians of N batches after a
   warm-up; inputs start on the CPU, as in the stages):

   * a GPT-2-medium-shaped gpt2 (24 layers, width 1024, 16 heads, context 1024; the built-in
     word-level vocabulary of ~140 tokens, so the LM head is tiny) on random token ids, 128 and
     512 tokens per example, ``--tokens`` tokens per batch; a ResNet-50-shaped network
     (bottleneck [3, 4, 6, 3], widths [64, 128, 256, 512], ImageNet stem, 1000 labels) on random
     224x224 inputs, ``--images`` per batch. For each:
       forward     ``adapter.forward`` under inference mode (+ autocast);
       streams     ``adapter.streams`` alone (the capture on the GPU, nothing copied back);
       to host     ``_write_batch`` without the writer: capture, row selection, float16 cast
                   and copy to a host NumPy array (what extraction costs before Zarr);
       extraction  ``extract._write_batch`` into a real float16 ``ShardWriter`` (default chunk
                   options) on disk: capture, row selection, float16 cast, copy to the host and
                   Zarr writes; the writer's creation and close are spread over the batches;
       ablation    ``ablate.score`` (logits, next-token/label top-1 and top-5) inside
                   ``adapter.ablated({middle block})``, and with nothing ablated;
     with each one's throughput (tokens/s or images/s) and its ratio to the forward pass;
   * training steps of a GPT-2-medium-shaped gptr2 (AdamW, ``--train-batch`` blocks of 1024
     tokens of the built-in corpus) and a ResNet-50-shaped RMSNorm ResNet (SGD with momentum,
     ``--train-images`` random 224x224 images, random labels), float32, bfloat16 autocast and
     float16 autocast with GradScaler. The loop is ``train.train``'s step (its ``build``,
     ``make_optimizer``, ``learning_rate``, ``on_device`` and ``forward``; the same order of
     scaler, clipping, optimizer and schedule calls) on batches already in memory, without its
     DataLoader, evaluation, checkpoints and model saving, which ``train.train`` does not let a
     caller leave out;
   * peak GPU memory of every case (``torch.cuda.max_memory_allocated``).

A summary table ends the output. Sections that fail print their traceback and are marked
FAILED; the rest still run.

Run from the repository root:

    .venv/bin/python benchmarks/gpu_stages.py                 # on a CUDA machine, ~5 min
    .venv/bin/python benchmarks/gpu_stages.py --quick --device cpu   # small shapes, CPU: tests
                                                                    # the harness (~3 min)
    .venv/bin/python benchmarks/gpu_stages.py --skip-throughput       # only the checks
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflow_scripts import ablate as ablate_stage  # noqa: E402
from workflow_scripts import extract as extract_stage  # noqa: E402
from workflow_scripts import families  # noqa: E402
from workflow_scripts import tokenize as tokenize_stage  # noqa: E402
from workflow_scripts import train as train_stage  # noqa: E402
from workflow_scripts.activations import ShardWriter, open_shard  # noqa: E402
from workflow_scripts.batches import Batch, autocast  # noqa: E402
from workflow_scripts.data import builtin, store  # noqa: E402
from workflow_scripts.fetch_model import fetch  # noqa: E402
from workflow_scripts.models import load_adapter  # noqa: E402
from workflow_scripts.options.ablation import AblationOptions  # noqa: E402
from workflow_scripts.options.extract import ExtractOptions  # noqa: E402

MODES = (None, "bfloat16", "float16")  # autocast / mixed_precision settings compared
SUMMARY: list[dict] = []  # rows of the final table
CHECKS: list[tuple[str, bool, str]] = []  # (what, passed, detail)

# ---------------------------------------------------------------------------------------------
# part 1: the stages' CUDA paths against the CPU

TINY_TEXT = {"layers": 4, "width": 64, "heads": 4, "context": 64}
CHECK_MODELS = {
    "gpt2": {"family": "gpt2", "source": "init:", "seed": 0, "arch": TINY_TEXT},
    "gptr2": {"family": "gptr2", "source": "init:", "seed": 0, "arch": TINY_TEXT},
    "bert": {
        "family": "bert",
        "source": "init:",
        "seed": 0,
        "arch": TINY_TEXT,
        "head": "sequence_classification",
        "num_labels": 3,
    },
    "resnet": {
        "family": "resnet",
        "source": "init:",
        "seed": 0,
        "num_labels": 10,
        "arch": {"block": "basic", "layers": [1, 2], "widths": [8, 16], "stem": "cifar"},
    },
    "resnet-rms": {
        "family": "resnet",
        "source": "init:",
        "seed": 0,
        "num_labels": 10,
        "arch": {
            "block": "bottleneck",
            "layers": [1, 1],
            "widths": [8, 16],
            "stem": "cifar",
            "norm": "rms",
        },
    },
}
CHECK_PAIRS = {
    "gpt2": "corpus",
    "gptr2": "corpus",
    "bert": "pairs",
    "resnet": "shapes",
    "resnet-rms": "shapes",
}
ABLATION_MODELS = ("gpt2", "bert", "resnet", "resnet-rms")
EXTRACT_CHECK_OPTIONS = {
    "dtype": "float32",
    "batch_size": 8,
    "max_tokens": 48,
    "padding": "longest",
    "rows_per_example": None,
    "chunk_rows": 64,
    "chunks_per_shard": 4,
    "compression": "none",
    "gpt2_final_readout": "raw",
    "seed": 0,
}
ABLATION_CHECK_OPTIONS = {"batch_size": 8, "max_tokens": 48, "padding": "longest"}
EXTRACT_TOLERANCE = {None: 5e-3, "float16": 3e-2, "bfloat16": 1e-1}  # max err / layer RMS
ABLATION_TOLERANCE = {None: 0.02, "float16": 0.05, "bfloat16": 0.05}  # accuracy, absolute

TRAIN_COMMON = {
    "seed": 0,
    "eval_fraction": 0.1,
    "eval_every": 50,
    "checkpoint_every": 1000,
    "warmup_steps": 5,
    "schedule": "cosine",
    "clip_grad_norm": 1.0,
    "batch_size": 16,
    "max_tokens": 64,
    "context": 32,
}
TRAIN_CHECKS = {
    "lm-gptr2": (
        {
            **TRAIN_COMMON,
            "kind": "causal_lm",
            "family": "gptr2",
            "arch": {"layers": 2, "width": 64, "heads": 2, "context": 64},
            "optimizer": {"name": "adam", "lr": 0.003},
            "steps": 60,
        },
        "train-corpus-tokens",
        0.8,
    ),
    "resnet-rms": (
        {
            **TRAIN_COMMON,
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
            "steps": 200,  # 100 left the loss above 0.9x on some draws of the data
        },
        "train-shapes",
        0.9,
    ),
}


def check(what: str, passed: bool, detail: str) -> None:
    CHECKS.append((what, passed, detail))
    print(f"  [{'ok' if passed else 'FAIL'}] {what}: {detail}", flush=True)


@contextlib.contextmanager
def quiet_stderr():
    """The stages' progress bars and log lines go to a buffer (printed if the stage fails)."""
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        try:
            yield
        except BaseException:
            sys.stdout.write(buffer.getvalue()[-4000:])
            raise


def token_blocks(tokenizer, texts, context: int) -> torch.Tensor:
    """The texts as the tokenize rule lays them out (end-of-text after each), in blocks."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream = [t for text in ids for t in (*text, tokenize_stage.separator(tokenizer))]
    blocks = len(stream) // context
    return torch.tensor(stream[: blocks * context]).view(blocks, context)


def write_data(work: Path) -> dict[str, Path]:
    paths = {}
    for name, source, rows in (
        ("corpus", "corpus", 48),
        ("pairs", "pairs", 32),
        ("shapes", "shapes", 64),
        ("train-corpus", "corpus", 300),
        ("train-shapes", "shapes", 400),
    ):
        kind = {"corpus": "text", "pairs": "pairs", "shapes": "image"}[source]
        paths[name] = work / f"{name}.parquet"
        store.write(
            builtin.generate(source, rows, seed=0), paths[name], kind, builtin.label_names(source)
        )
    # a language model trains on the token file of its data and tokenizer
    paths["train-corpus-tokens"] = work / "train-corpus.npy"
    tokenize_stage.tokenize(
        paths["train-corpus"],
        paths["train-corpus-tokens"],
        builtin_style=families.get("gptr2").tokenizer,
    )
    return paths


def mode_name(mode: str | None) -> str:
    return mode or "float32"


def run_extract(model_dir, data, out, options, threads) -> list[np.ndarray]:
    with quiet_stderr():
        torch.set_num_threads(threads)
        typed = ExtractOptions(**options)
        extract_stage.extract(model_dir, data, 0, 1, out, typed, workers=max(0, threads - 1))
    group = open_shard(out)
    names = [f"layer-{r['index']}" for r in group.attrs["readouts"]]
    return [group[n][:] for n in names] + [
        group[n][:] for n in ("example_id", "position", "is_padding")
    ]


def run_ablate(model_dir, data, out, options, threads) -> pd.DataFrame:
    with quiet_stderr():
        ablate_stage.run(
            model=str(model_dir),
            data=str(data),
            options=AblationOptions(**options),
            model_name="m",
            dataset_name="d",
            out=str(out),
            threads=threads,
        )
    return pd.read_parquet(out)


def run_train(name, spec, data, out: Path, threads) -> pd.DataFrame:
    with quiet_stderr():
        train_stage.run(
            model=name,
            spec=spec,
            data=str(data),
            base=None,
            tokenizer=None,
            checkpoint=str(out / "checkpoint.pt"),
            metrics=str(out / "metrics.parquet"),
            plot=str(out / "loss.png"),
            out=str(out / "model"),
            threads=threads,
        )
    return pd.read_parquet(out / "metrics.parquet")


def check_extraction(work, models, data, device, threads) -> None:
    print(f"\n== extraction: {device} against cpu (stored float32)")
    for name, dataset in CHECK_PAIRS.items():
        options = {**EXTRACT_CHECK_OPTIONS, "device": "cpu", "autocast": None}
        reference = run_extract(
            models[name], data[dataset], work / f"x-{name}-cpu.zarr", options, threads
        )
        for mode in MODES:
            options = {**EXTRACT_CHECK_OPTIONS, "device": device, "autocast": mode}
            got = run_extract(
                models[name],
                data[dataset],
                work / f"x-{name}-{device}-{mode_name(mode)}.zarr",
                options,
                threads,
            )
            layers = len(reference) - 3
            errors = [
                float(np.abs(g - r).max() / max(np.sqrt(np.mean(r.astype(np.float64) ** 2)), 1e-12))
                for g, r in zip(got[:layers], reference[:layers])
            ]
            index_same = all(np.array_equal(g, r) for g, r in zip(got[layers:], reference[layers:]))
            worst = max(errors)
            check(
                f"extract {name} on {dataset}, {mode_name(mode)}",
                worst <= EXTRACT_TOLERANCE[mode]
                and index_same
                and got[0].shape == reference[0].shape,
                f"{layers} read-outs x {reference[0].shape[0]} rows, max |d|/rms {worst:.2e} "
                f"(tol {EXTRACT_TOLERANCE[mode]:.0e}), index arrays "
                f"{'identical' if index_same else 'DIFFER'}",
            )


def check_ablation(work, models, data, device, threads) -> None:
    print(f"\n== ablation: {device} against cpu")
    for name in ABLATION_MODELS:
        dataset = CHECK_PAIRS[name]
        options = {**ABLATION_CHECK_OPTIONS, "device": "cpu", "autocast": None}
        reference = run_ablate(
            models[name], data[dataset], work / f"a-{name}-cpu.parquet", options, threads
        )
        for mode in MODES:
            options = {**ABLATION_CHECK_OPTIONS, "device": device, "autocast": mode}
            got = run_ablate(
                models[name],
                data[dataset],
                work / f"a-{name}-{device}-{mode_name(mode)}.parquet",
                options,
                threads,
            )
            keys = ["layer", "direction", "metric"]
            merged = reference.merge(got, on=keys, suffixes=("_cpu", "_gpu"))
            same_rows = (
                len(merged) == len(reference) == len(got)
                and (merged["predictions_cpu"] == merged["predictions_gpu"]).all()
            )
            diff = (merged["value_cpu"] - merged["value_gpu"]).abs()
            check(
                f"ablate {name} on {dataset}, {mode_name(mode)}",
                bool(same_rows and diff.max() <= ABLATION_TOLERANCE[mode]),
                f"{len(merged)} accuracies, {int((diff == 0).sum())} equal, max |d| "
                f"{diff.max():.4f} (tol {ABLATION_TOLERANCE[mode]}), predictions per pass "
                f"{int(merged['predictions_cpu'].iloc[0])}"
                f"{'' if same_rows else ', ROWS OR COUNTS DIFFER'}",
            )


def check_training(work, data, device, threads) -> None:
    print(f"\n== training: {device} (mixed_precision null/bfloat16/float16) and cpu")
    for name, (spec, dataset, factor) in TRAIN_CHECKS.items():
        runs = {}
        for where, mode in [("cpu", None)] + [(device, m) for m in MODES]:
            label = f"{where}-{mode_name(mode)}" if runs else "cpu-reference"
            started = time.perf_counter()
            metrics = run_train(
                name,
                {**spec, "device": where, "mixed_precision": mode},
                data[dataset],
                work / f"t-{name}-{label}",
                threads,
            )
            runs[label] = (metrics, time.perf_counter() - started)
        cpu = runs["cpu-reference"][0]
        for label, (metrics, seconds) in runs.items():
            loss = metrics["loss"]
            first, last = loss.iloc[:5].mean(), loss.iloc[-10:].mean()
            finite = bool(np.isfinite(loss).all())
            start_gap = abs(loss.iloc[0] - cpu["loss"].iloc[0])
            accuracy = metrics["eval_accuracy"].dropna().iloc[-1]
            skipped = int((~np.isfinite(metrics["grad_norm"])).sum())
            check(
                f"train {name}, {label}",
                finite and last < factor * first,
                f"{len(loss)} steps in {seconds:.1f} s, loss {first:.3f} -> {last:.3f} "
                f"(first 5 / last 10 means, need < {factor}x), step-0 loss {loss.iloc[0]:.4f} "
                f"(cpu {cpu['loss'].iloc[0]:.4f}, |d| {start_gap:.1e}), held-out accuracy "
                f"{accuracy:.3f} (cpu {cpu['eval_accuracy'].dropna().iloc[-1]:.3f}), "
                f"non-finite grad norms (scaler skips) {skipped}",
            )


def run_checks(work: Path, device: str, threads: int) -> None:
    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    data = write_data(work)
    models = {}
    for name, spec in CHECK_MODELS.items():
        models[name] = work / "models" / name
        with quiet_stderr():
            fetch(copy.deepcopy(spec), models[name])
    for section in (
        lambda: check_extraction(work, models, data, device, threads),
        lambda: check_ablation(work, models, data, device, threads),
        lambda: check_training(work, data, device, threads),
    ):
        try:
            section()
        except Exception:
            traceback.print_exc(file=sys.stdout)
            check("section", False, "raised (traceback above)")


# ---------------------------------------------------------------------------------------------
# part 2: throughput on full-size random-initialised models


def gpt2_spec(args) -> dict:
    return {
        "family": "gpt2",
        "source": "init:",
        "seed": 0,
        "arch": {
            "layers": args.layers,
            "width": args.width,
            "heads": args.heads,
            "context": args.context,
        },
    }


def resnet_arch(args) -> dict:
    return {
        "block": "bottleneck",
        "layers": args.resnet_layers,
        "widths": [64, 128, 256, 512],
        "stem": "imagenet",
    }


EXTRACT_OPTIONS = {
    "dtype": "float16",
    "rows_per_example": None,
    "chunk_rows": 1024,
    "chunks_per_shard": 8,
    "compression": "none",
    "gpt2_final_readout": "raw",
    "seed": 0,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


def timed(fn, iterations: int, device: torch.device, warmup: int = 1) -> list[float]:
    """Seconds of each of ``iterations`` calls of ``fn`` after ``warmup`` untimed ones, each
    between two synchronisations of the device."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def record(
    model: str,
    case: str,
    mode,
    work_per_call: float,
    unit: str,
    seconds: float,
    reference: float | None,
    peak: float,
    note: str = "",
    per: str = "batch",
) -> None:
    rate = work_per_call / seconds
    ratio = reference / seconds if reference else math.nan
    SUMMARY.append(
        {
            "model": model,
            "case": case,
            "mode": mode_name(mode),
            "rate": rate,
            "unit": unit,
            "ratio": ratio,
            "peak_gib": peak,
            "note": note,
        }
    )
    ratio_text = f"   ratio to forward {ratio:.3f}" if reference else ""
    print(
        f"    {case + ', ' + mode_name(mode):<40}{1000 * seconds:>9.1f} ms/{per} {rate:>12,.0f} "
        f"{unit}{ratio_text}",
        flush=True,
    )


def inference_cases(
    name: str,
    adapter,
    batch: Batch,
    work_per_batch: float,
    unit: str,
    device: torch.device,
    iterations: int,
    work: Path,
    extract_batches: int,
) -> None:
    """forward, streams, extraction and ablation of one batch, per autocast mode."""
    blocks = len(adapter.block_slots)
    middle = blocks // 2
    for mode in MODES:
        print(f"  -- {name}, {mode_name(mode)}")
        reset_peak(device)
        options = {**EXTRACT_OPTIONS, "device": device.type, "autocast": mode}

        def forward():
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            with torch.inference_mode(), autocast(device, mode):
                adapter.forward(inputs)

        def streams():
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            with torch.inference_mode(), autocast(device, mode):
                adapter.streams(inputs)

        def to_host():
            """``_write_batch`` without the writer: capture, row selection, float16, host copy."""
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            with torch.inference_mode(), autocast(device, mode):
                captured = adapter.streams(inputs)
            if batch.padding is not None:
                examples, tokens = batch.padding.shape
                keep = [
                    extract_stage._kept_positions(p, e, ExtractOptions(**options))
                    for p, e in zip(batch.padding, batch.example_id)
                ]
                flat = torch.from_numpy(
                    np.concatenate([i * tokens + k for i, k in enumerate(keep)])
                ).to(device)
                captured = [
                    s.reshape(examples * tokens, -1).index_select(0, flat) for s in captured
                ]
            [s.to(torch.float16).cpu().numpy() for s in captured]

        base = statistics.median(timed(forward, iterations, device))
        record(name, "forward", mode, work_per_batch, unit, base, None, peak_gib(device))
        reset_peak(device)
        seconds = statistics.median(timed(streams, iterations, device))
        record(
            name,
            "streams (capture only)",
            mode,
            work_per_batch,
            unit,
            seconds,
            base,
            peak_gib(device),
        )
        reset_peak(device)
        seconds = statistics.median(timed(to_host, iterations, device))
        record(
            name,
            "streams + float16 to host",
            mode,
            work_per_batch,
            unit,
            seconds,
            base,
            peak_gib(device),
        )

        # extraction: a writer for warm-up + timed batches; its setup and close spread over them
        rows = len(batch.example_id) * (1 if batch.padding is None else batch.padding.shape[1])
        reset_peak(device)
        path = work / f"{name}-{mode_name(mode)}.zarr".replace(" ", "_")
        t = time.perf_counter()
        writer = ShardWriter(
            path,
            adapter.readouts,
            rows * (extract_batches + 1),
            options["dtype"],
            options["chunk_rows"],
            options["chunks_per_shard"],
        )
        fixed = time.perf_counter() - t
        per_batch = timed(
            lambda: extract_stage._write_batch(
                adapter, batch, writer, device, ExtractOptions(**options)
            ),
            extract_batches,
            device,
        )
        t = time.perf_counter()
        writer.close({"benchmark": True})
        fixed += time.perf_counter() - t
        shutil.rmtree(path)
        seconds = statistics.median(per_batch) + fixed / (extract_batches + 1)
        stored = rows * sum(r.width for r in adapter.readouts) * 2 / 2**20
        record(
            name,
            "extraction (_write_batch)",
            mode,
            work_per_batch,
            unit,
            seconds,
            base,
            peak_gib(device),
            f"{stored:.0f} MiB float16 per batch; writer setup+close "
            f"{fixed:.2f} s over {extract_batches + 1} batches",
        )

        top5 = (adapter.num_labels if adapter.head != "causal_lm" else len(adapter.tokenizer)) > 5
        for label, ablated in (
            (f"ablation score, block {middle}", {middle}),
            ("score, nothing ablated", set()),
        ):

            def score():
                with adapter.ablated(ablated):
                    ablate_stage.score(adapter, [batch], device, mode, top5)

            reset_peak(device)
            seconds = statistics.median(timed(score, iterations, device))
            record(name, label, mode, work_per_batch, unit, seconds, base, peak_gib(device))


def text_throughput(args, device: torch.device, work: Path) -> None:
    spec = gpt2_spec(args)
    fetch(spec, work / "gpt2-big")
    adapter, _ = load_adapter(work / "gpt2-big")
    adapter.to(device)
    params = sum(p.numel() for p in adapter.model.parameters())
    vocab = len(adapter.tokenizer)
    arch = spec["arch"]
    print(
        f"\n== gpt2 {arch['layers']}x{arch['width']} ({arch['heads']} heads, context "
        f"{arch['context']}), {params / 1e6:.0f} M parameters, vocabulary {vocab}"
    )
    generator = torch.Generator().manual_seed(0)
    for tokens in args.seq:
        examples = max(1, args.tokens // tokens)
        ids = torch.randint(vocab, (examples, tokens), generator=generator)
        batch = Batch(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            np.arange(examples),
            np.zeros((examples, tokens), bool),
            None,
        )
        inference_cases(
            f"gpt2-{arch['layers']}x{arch['width']} @{tokens} tok x{examples}",
            adapter,
            batch,
            examples * tokens,
            "tok/s",
            device,
            args.iterations,
            work,
            args.extract_batches,
        )
    adapter.to("cpu")
    del adapter


def image_throughput(args, device: torch.device, work: Path) -> None:
    spec = {
        "family": "resnet",
        "source": "init:",
        "seed": 0,
        "num_labels": 1000,
        "arch": resnet_arch(args),
    }
    fetch(spec, work / "resnet-big")
    adapter, _ = load_adapter(work / "resnet-big")
    adapter.to(device)
    params = sum(p.numel() for p in adapter.model.parameters())
    print(
        f"\n== resnet bottleneck {args.resnet_layers} (ImageNet stem, 1000 labels), "
        f"{params / 1e6:.1f} M parameters, {args.images} images of {args.size}x{args.size}"
    )
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.images, 3, args.size, args.size, generator=generator)
    labels = torch.randint(1000, (args.images,), generator=generator).numpy()
    batch = Batch({"pixel_values": pixels}, np.arange(args.images), None, labels)
    inference_cases(
        f"resnet{sum(args.resnet_layers) * 3 + 2} x{args.images}",
        adapter,
        batch,
        args.images,
        "img/s",
        device,
        args.iterations,
        work,
        args.extract_batches,
    )
    adapter.to("cpu")
    del adapter


def train_throughput(
    name: str,
    spec: dict,
    data: dict[str, torch.Tensor],
    work_per_step: float,
    unit: str,
    device: torch.device,
    steps: int,
    warmup: int,
) -> None:
    """``train.train``'s step loop on ``data`` (already tensors), timed per step."""
    for mode in MODES:
        reset_peak(device)
        model, _, _ = train_stage.build(spec, None)
        model.to(device).train()
        optimizer = train_stage.make_optimizer(model, spec["optimizer"])
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: train_stage.learning_rate(s, spec)
        )
        scaler = torch.amp.GradScaler(
            device.type, enabled=mode == "float16" and device.type == "cuda"
        )
        n = len(next(iter(data.values())))
        losses, times, skipped = [], [], 0
        try:
            for step in range(warmup + steps):
                sync(device)
                t = time.perf_counter()
                torch.manual_seed(spec["seed"] * 1_000_003 + step)
                index = torch.randint(n, (spec["batch_size"],))
                batch = train_stage.on_device({k: v[index] for k, v in data.items()}, device, None)
                with autocast(device, mode):
                    loss, _, _ = train_stage.forward(model, spec["kind"], batch)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"loss {loss.item()} at step {step}")
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip_grad_norm"])
                )
                skipped += not math.isfinite(grad_norm)
                losses.append(loss.item())
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                sync(device)
                if step >= warmup:
                    times.append(time.perf_counter() - t)
            seconds = statistics.median(times)
            finite = all(math.isfinite(x) for x in losses)
            note = (
                f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
                f"{'' if finite else ' NON-FINITE'}, scaler-skipped steps {skipped}"
            )
            record(
                name,
                "train step",
                mode,
                work_per_step,
                unit,
                seconds,
                None,
                peak_gib(device),
                note,
                per="step",
            )
            print(
                f"    {'':<40}{1 / seconds:>9.2f} steps/s; {note}; peak {peak_gib(device):.1f} GiB",
                flush=True,
            )
            SUMMARY[-1]["steps_per_s"] = 1 / seconds
        except torch.OutOfMemoryError:
            print(f"    train step {mode_name(mode)}: out of memory", flush=True)
            SUMMARY.append(
                {
                    "model": name,
                    "case": "train step",
                    "mode": mode_name(mode),
                    "rate": math.nan,
                    "unit": unit,
                    "ratio": math.nan,
                    "peak_gib": peak_gib(device),
                    "note": "OUT OF MEMORY",
                }
            )
        finally:
            del model, optimizer, schedule
            if device.type == "cuda":
                torch.cuda.empty_cache()


def training_throughput(args, device: torch.device) -> None:
    common = {
        "seed": 0,
        "warmup_steps": 0,
        "schedule": "constant",
        "clip_grad_norm": 1.0,
        "steps": 1000,
    }
    arch = {
        "layers": args.layers,
        "width": args.width,
        "heads": args.heads,
        "context": args.context,
    }
    spec = {
        **common,
        "kind": "causal_lm",
        "family": "gptr2",
        "arch": arch,
        "context": args.context,
        "batch_size": args.train_batch,
        "optimizer": {"name": "adamw", "lr": 3e-4, "weight_decay": 0.1},
    }
    _, tokenizer, _ = train_stage.build({**spec, "arch": {**arch, "layers": 1}}, None)
    blocks_needed = 4 * args.train_batch
    frame = builtin.generate("corpus", int(blocks_needed * args.context / 30) + 50, seed=0)
    data = {"input_ids": token_blocks(tokenizer, frame["text"], args.context)}
    name = f"gptr2-{args.layers}x{args.width} @{args.context} x{args.train_batch}"
    print(f"\n== training {name} (AdamW), {len(data['input_ids'])} blocks of the built-in corpus")
    train_throughput(
        name,
        spec,
        data,
        args.train_batch * args.context,
        "tok/s",
        device,
        args.train_steps,
        args.train_warmup,
    )

    spec = {
        **common,
        "kind": "image_classification",
        "num_labels": 1000,
        "arch": {**resnet_arch(args), "norm": "rms"},
        "batch_size": args.train_images,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    }
    generator = torch.Generator().manual_seed(0)
    examples = 2 * args.train_images
    data = {
        "pixel_values": torch.randn(examples, 3, args.size, args.size, generator=generator),
        "labels": torch.randint(1000, (examples,), generator=generator),
    }
    name = f"resnet{sum(args.resnet_layers) * 3 + 2}-rms x{args.train_images}"
    print(f"\n== training {name} (SGD, momentum 0.9), random {args.size}x{args.size} images")
    train_throughput(
        name, spec, data, args.train_images, "img/s", device, args.train_steps, args.train_warmup
    )


def run_throughput(args, device: torch.device, work: Path) -> None:
    for section in (
        lambda: text_throughput(args, device, work),
        lambda: image_throughput(args, device, work),
        lambda: training_throughput(args, device),
    ):
        try:
            section()
        except Exception:
            traceback.print_exc(file=sys.stdout)
            SUMMARY.append(
                {
                    "model": "?",
                    "case": "section FAILED (traceback above)",
                    "mode": "",
                    "rate": math.nan,
                    "unit": "",
                    "ratio": math.nan,
                    "peak_gib": math.nan,
                    "note": "",
                }
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------


def print_summary(device: torch.device, started: float) -> None:
    print("\n" + "=" * 100 + "\nSUMMARY")
    if CHECKS:
        failed = [c for c in CHECKS if not c[1]]
        print(
            f"checks: {len(CHECKS) - len(failed)}/{len(CHECKS)} passed ({device.type} against cpu)"
        )
        for what, _, detail in failed:
            print(f"  FAILED {what}: {detail}")
    if SUMMARY:
        print(
            f"\n{'model':<34}{'case':<31}{'mode':<10}{'throughput':>16}  {'x fwd':>6}"
            f"{'peak GiB':>9}  note"
        )
        for row in SUMMARY:
            ratio = "" if math.isnan(row["ratio"]) else f"{row['ratio']:.3f}"
            rate = f"{row['rate']:,.0f} {row['unit']}" if not math.isnan(row["rate"]) else "-"
            if "steps_per_s" in row:
                rate = f"{row['steps_per_s']:.2f}/s {rate}"
            peak = "" if math.isnan(row["peak_gib"]) else f"{row['peak_gib']:.1f}"
            print(
                f"{row['model']:<34}{row['case']:<31}{row['mode']:<10}{rate:>16}  {ratio:>6}"
                f"{peak:>9}  {row['note']}"
            )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small shapes (gpt2 2x256, a small bottleneck ResNet at 64x64) "
        "and few iterations: to test the harness on a CPU",
    )
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--threads", type=int, default=4, help="torch CPU threads (default 4)")
    parser.add_argument("--tokens", type=int, help="tokens per inference batch (default 8192)")
    parser.add_argument("--seq", type=int, nargs="+", help="tokens per example (128 512)")
    parser.add_argument("--images", type=int, help="images per inference batch (default 128)")
    parser.add_argument("--train-batch", type=int, help="LM blocks per training step (8)")
    parser.add_argument("--train-images", type=int, help="images per training step (128)")
    parser.add_argument("--iterations", type=int, help="timed batches per case (default 10)")
    parser.add_argument(
        "--extract-batches", type=int, help="timed extraction batches per case (default 3)"
    )
    parser.add_argument("--train-steps", type=int, help="timed training steps (default 10)")
    args = parser.parse_args(argv)
    q = args.quick
    for key, full, quick in (
        ("tokens", 8192, 512),
        ("seq", [128, 512], [64, 128]),
        ("images", 128, 8),
        ("train_batch", 8, 2),
        ("train_images", 128, 8),
        ("iterations", 10, 2),
        ("extract_batches", 3, 1),
        ("train_steps", 10, 3),
    ):
        if getattr(args, key) is None:
            setattr(args, key, quick if q else full)
    args.layers, args.width, args.heads, args.context = (
        (2, 256, 4, 128) if q else (24, 1024, 16, 1024)
    )
    args.resnet_layers = [1, 1, 1, 1] if q else [3, 4, 6, 3]
    args.size = 64 if q else 224
    args.train_warmup = 1 if q else 3

    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
        + (
            f" ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, matmul TF32 "
            f"{torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 "
            f"{torch.backends.cudnn.allow_tf32})"
            if device.type == "cuda"
            else ""
        )
        + f", {torch.get_num_threads()} CPU threads",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-stages-") as tmp:
        work = Path(tmp)
        if not args.skip_checks:
            (work / "checks").mkdir()
            run_checks(work / "checks", device.type, args.threads)
            torch.set_num_threads(args.threads)
            print(f"checks done at {time.perf_counter() - started:.0f} s", flush=True)
        if not args.skip_throughput:
            (work / "throughput").mkdir()
            run_throughput(args, device, work / "throughput")
    print_summary(device, started)


if __name__ == "__main__":
    main()
