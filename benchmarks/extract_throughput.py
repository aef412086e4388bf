"""Extraction throughput against the bare forward pass of the same model, on the same batches.

For two random-initialised models on CPU -- a GPT-2-small-shaped transformer (12 layers, width
768, 12 heads, context 128) on text from the built-in corpus, and a ResNet-18-shaped network
(basic blocks [2, 2, 2, 2], widths [64, 128, 256, 512], ImageNet stem, 1000 labels) on random
224x224 inputs -- it times, side by side in one run:

* forward:    ``adapter.forward(inputs)`` under ``torch.inference_mode()`` over every batch;
* extraction: what ``workflow_scripts.extract`` does per batch, ``_write_batch(adapter, batch,
  writer, device, options)`` into a real float16 ``ShardWriter`` on disk (a temporary
  directory), with the default extraction options; the writer's creation and ``close`` (the
  last flush) are counted too.

The two sides are interleaved batch by batch: the forward and the extraction of batch i run
back to back, which one first alternating, over N repetitions after a warm-up batch, so machine
noise hits both alike. Reported: "best" (per batch the fastest repetition, summed; for the
extraction plus the fastest writer setup/close) and the median of the repetitions' totals, with
examples/s, rows/s (rows as the store counts them: every token position, padding included, for
text; one per image) and the ratio of extraction to forward throughput (the target is at least
0.8). ``--breakdown`` adds to every repetition an extra extraction pass that times its parts
separately (stream capture, row selection + float16 cast + copy to NumPy, the writer's
buffering and Zarr writes) and reports each part's fastest.

Run from the repository root:

    .venv/bin/python benchmarks/extract_throughput.py              # about 1.5 min on 2 cores
    .venv/bin/python benchmarks/extract_throughput.py --quick      # about 30 s
    .venv/bin/python benchmarks/extract_throughput.py --breakdown  # adds the per-part timings
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflow_scripts.activations import ShardWriter  # noqa: E402
from workflow_scripts.batches import Batch, text_batches  # noqa: E402
from workflow_scripts.data import builtin, store  # noqa: E402
from workflow_scripts.extract import _kept_positions, _write_batch  # noqa: E402
from workflow_scripts.fetch_model import fetch  # noqa: E402
from workflow_scripts.models import load_adapter  # noqa: E402

# the defaults of ``extract`` in workflow_scripts/config.schema.yaml (device: cpu here)
OPTIONS = {
    "dtype": "float16",
    "batch_size": 32,
    "max_tokens": 128,
    "padding": "longest",
    "rows_per_example": None,
    "device": "cpu",
    "autocast": None,
    "chunk_rows": 1024,
    "chunks_per_shard": 8,
    "compression": "none",
    "gpt2_final_readout": "raw",
    "seed": 0,
}

GPT2_SPEC = {
    "family": "gpt2",
    "source": "init:",
    "seed": 0,
    "arch": {"layers": 12, "width": 768, "heads": 12, "context": 128},
}
RESNET_SPEC = {
    "family": "resnet",
    "source": "init:",
    "seed": 0,
    "num_labels": 1000,
    "arch": {
        "block": "basic",
        "layers": [2, 2, 2, 2],
        "widths": [64, 128, 256, 512],
        "stem": "imagenet",
    },
}


def text_case(work: Path, examples: int):
    """The GPT-2-shaped adapter and its batches of the built-in corpus, as extraction makes
    them (stored as a text dataset, read back, tokenized and padded per batch)."""
    fetch(GPT2_SPEC, work / "gpt2")
    adapter, _ = load_adapter(work / "gpt2", OPTIONS["gpt2_final_readout"])
    store.write(builtin.generate("corpus", examples, seed=0), work / "corpus.parquet", "text", None)
    dataset = store.DatasetFile(work / "corpus.parquet")
    batches = list(
        text_batches(
            adapter.tokenizer,
            dataset,
            0,
            dataset.rows,
            OPTIONS["batch_size"],
            OPTIONS["max_tokens"],
            OPTIONS["padding"],
        )
    )
    rows = sum(
        len(_kept_positions(p, e, OPTIONS))
        for b in batches
        for p, e in zip(b.padding, b.example_id)
    )
    return adapter, batches, rows


def image_case(work: Path, images: int):
    """The ResNet-18-shaped adapter and batches of random 224x224 inputs (one row each)."""
    fetch(RESNET_SPEC, work / "resnet")
    adapter, _ = load_adapter(work / "resnet")
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(images, 3, 224, 224, generator=generator)
    size = OPTIONS["batch_size"]
    batches = [
        Batch(
            {"pixel_values": pixels[s : s + size]}, np.arange(s, min(s + size, images)), None, None
        )
        for s in range(0, images, size)
    ]
    return adapter, batches, images


def forward_batch(adapter, batch: Batch, device) -> None:
    """The bare forward pass on one batch."""
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    with torch.inference_mode():
        adapter.forward(inputs)


def new_writer(adapter, rows: int, path: Path) -> ShardWriter:
    return ShardWriter(
        path,
        adapter.readouts,
        rows,
        OPTIONS["dtype"],
        OPTIONS["chunk_rows"],
        OPTIONS["chunks_per_shard"],
    )


def paired_pass(
    adapter, batches, rows, device, path: Path, repetition: int = 0
) -> tuple[list[float], list[float], float]:
    """One repetition: the bare forward and the extraction (into one shard writer) of every
    batch, back to back, which one first alternating by batch and repetition. Returns the
    per-batch forward and extraction times and the writer's fixed cost (creation + close, the
    last flush), which belongs to the extraction side."""
    forward, extraction = [], []
    t = time.perf_counter()
    writer = new_writer(adapter, rows, path)
    fixed = time.perf_counter() - t
    for i, batch in enumerate(batches):
        for side in (
            ("forward", "extraction") if (i + repetition) % 2 == 0 else ("extraction", "forward")
        ):
            t = time.perf_counter()
            if side == "forward":
                forward_batch(adapter, batch, device)
                forward.append(time.perf_counter() - t)
            else:
                _write_batch(adapter, batch, writer, device, OPTIONS)
                extraction.append(time.perf_counter() - t)
    t = time.perf_counter()
    writer.close({"benchmark": True})
    fixed += time.perf_counter() - t
    shutil.rmtree(path)  # untimed; keeps the temporary directory small
    return forward, extraction, fixed


def breakdown(adapter, batches, rows, device, path: Path) -> dict[str, float]:
    """One extraction pass with its parts timed apart; mirrors ``_write_batch`` step by step."""
    times = dict.fromkeys(
        [
            "writer setup",
            "stream capture",
            "select + float16 + numpy",
            "writer.append (buffer copy + Zarr writes)",
            "writer.close (last flush)",
        ],
        0.0,
    )
    keys = list(times)
    store_dtype = getattr(torch, OPTIONS["dtype"])
    t = time.perf_counter()
    writer = new_writer(adapter, rows, path)
    times[keys[0]] += time.perf_counter() - t
    for batch in batches:
        t = time.perf_counter()
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        with torch.inference_mode():
            streams = adapter.streams(inputs)
        times[keys[1]] += time.perf_counter() - t
        t = time.perf_counter()
        if batch.padding is None:
            arrays = [s.to(store_dtype).cpu().numpy() for s in streams]
            n = len(batch.example_id)
            index = (batch.example_id, np.zeros(n, np.int32), np.zeros(n, bool))
        else:
            examples, tokens = batch.padding.shape
            keep = [_kept_positions(p, e, OPTIONS) for p, e in zip(batch.padding, batch.example_id)]
            flat = np.concatenate([i * tokens + k for i, k in enumerate(keep)])
            flat_rows = torch.from_numpy(flat).to(device)
            arrays = [
                s.reshape(examples * tokens, -1)
                .index_select(0, flat_rows)
                .to(store_dtype)
                .cpu()
                .numpy()
                for s in streams
            ]
            index = (
                np.repeat(batch.example_id, [len(k) for k in keep]),
                (flat % tokens).astype(np.int32),
                batch.padding.reshape(-1)[flat],
            )
        times[keys[2]] += time.perf_counter() - t
        t = time.perf_counter()
        writer.append(arrays, *index)
        times[keys[3]] += time.perf_counter() - t
    t = time.perf_counter()
    writer.close({"benchmark": True})
    times[keys[4]] += time.perf_counter() - t
    shutil.rmtree(path)
    return times


def batch_rows(batch: Batch) -> int:
    """The rows one batch gives in the store."""
    if batch.padding is None:
        return len(batch.example_id)
    return sum(len(_kept_positions(p, e, OPTIONS)) for p, e in zip(batch.padding, batch.example_id))


def measure(
    key: str, name: str, adapter, batches, rows: int, repeats: int, work: Path, with_breakdown: bool
) -> float:
    device = torch.device(OPTIONS["device"])
    adapter.to(device)
    examples = sum(len(b.example_id) for b in batches)
    readouts = adapter.readouts
    stored = rows * sum(r.width for r in readouts) * np.dtype(OPTIONS["dtype"]).itemsize
    print(
        f"\n== {name}: {examples} examples in {len(batches)} batches, {rows} rows, "
        f"{len(readouts)} read-outs, {stored / 2**20:.1f} MiB of {OPTIONS['dtype']} per pass"
    )
    # warm-up: one batch of each side (allocator, kernels, Zarr/codec imports)
    paired_pass(adapter, batches[:1], batch_rows(batches[0]), device, work / f"{key}-warmup.zarr")

    forward, extraction, fixed, parts = [], [], [], []
    for r in range(repeats):
        f, e, c = paired_pass(adapter, batches, rows, device, work / f"{key}.zarr", r)
        forward.append(f)
        extraction.append(e)
        fixed.append(c)
        line = (
            f"  repetition {r + 1}/{repeats}: forward {sum(f):.2f} s, "
            f"extraction {sum(e) + c:.2f} s (batches {sum(e):.2f} + writer setup/close "
            f"{c:.2f})"
        )
        if with_breakdown:
            parts.append(breakdown(adapter, batches, rows, device, work / f"{key}.zarr"))
            line += f", timed-parts pass {sum(parts[-1].values()):.2f} s"
        print(line)

    # best: per batch the fastest repetition (and the fastest writer setup/close), summed;
    # median: the median of the repetitions' totals
    totals = {
        "forward": [sum(f) for f in forward],
        "extraction": [sum(e) + c for e, c in zip(extraction, fixed)],
    }
    best = {
        "forward": sum(min(f[i] for f in forward) for i in range(len(batches))),
        "extraction": sum(min(e[i] for e in extraction) for i in range(len(batches))) + min(fixed),
    }
    print(
        f"  {'':<11}{'best s':>9}{'median s':>10}{'examples/s':>12}{'rows/s':>11}"
        "   (throughput from the best)"
    )
    for side in ("forward", "extraction"):
        print(
            f"  {side:<11}{best[side]:>9.2f}{statistics.median(totals[side]):>10.2f}"
            f"{examples / best[side]:>12.1f}{rows / best[side]:>11.1f}"
        )
    ratio_best = best["forward"] / best["extraction"]
    ratio_median = statistics.median(totals["forward"]) / statistics.median(totals["extraction"])
    verdict = "ok" if ratio_best >= 0.8 else "BELOW TARGET"
    print(
        f"  ratio extraction/forward throughput: {ratio_best:.3f} (best), "
        f"{ratio_median:.3f} (median)  [target >= 0.8: {verdict}]"
    )

    if with_breakdown:
        fastest = {part: min(p[part] for p in parts) for part in parts[0]}
        total = sum(fastest.values())
        print(
            f"  breakdown of the extraction, fastest of {repeats} timed-parts passes per part "
            f"(sum {total:.2f} s; forward best {best['forward']:.2f} s):"
        )
        for part, seconds in fastest.items():
            print(f"    {part:<44}{seconds:>8.3f} s {100 * seconds / total:>6.1f} %")
    return ratio_best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run: 32 text examples, 32 images, 2 repetitions",
    )
    parser.add_argument("--text-examples", type=int, help="corpus examples (default 128)")
    parser.add_argument("--images", type=int, help="224x224 images (default 64)")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="add a pass per repetition that times the parts of the extraction",
    )
    parser.add_argument("--only", choices=["gpt2", "resnet"], help="run one model only")
    args = parser.parse_args(argv)
    text_examples = args.text_examples or (32 if args.quick else 128)
    images = args.images or (32 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 3)

    import transformers  # quiet the model save/load progress bars and notices

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
        f"{OPTIONS['device']}, options {OPTIONS}"
    )
    started = time.perf_counter()
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="extract-throughput-") as tmp:
        work = Path(tmp)
        if args.only in (None, "gpt2"):
            adapter, batches, rows = text_case(work, text_examples)
            ratios["gpt2"] = measure(
                "gpt2",
                "gpt2-small (init, 12x768, ctx 128)",
                adapter,
                batches,
                rows,
                repeats,
                work,
                args.breakdown,
            )
            del adapter, batches
        if args.only in (None, "resnet"):
            adapter, batches, rows = image_case(work, images)
            ratios["resnet"] = measure(
                "resnet",
                "resnet18 (init, 224x224)",
                adapter,
                batches,
                rows,
                repeats,
                work,
                args.breakdown,
            )
    print(
        "\nsummary: "
        + ", ".join(f"{k} ratio {v:.3f}" for k, v in ratios.items())
        + f"; total {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
