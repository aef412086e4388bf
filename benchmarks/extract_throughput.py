"""Extraction throughput against the bare forward pass of the same model, on the same batches.

For two random-initialised models on CPU -- a GPT-2-small-shaped transformer (12 layers, width
768, 12 heads, context 128) on text from the built-in corpus, and a ResNet-18-shaped network
(basic blocks [2, 2, 2, 2], widths [64, 128, 256, 512], ImageNet stem, 1000 labels) on random
224x224 inputs -- it times, side by side in one run:

* forward:    ``adapter.forward(inputs)`` under ``torch.inference_mode()`` over every batch;
* extraction: what ``workflow_scripts.extract`` does, ``_write_batch(adapter, batch, writer,
  device, options)`` for every batch into a real float16 ``ShardWriter`` on disk (a temporary
  directory), with the default extraction options, from the writer's creation to its ``close``
  (the writer thread runs beside the forward passes, so only whole passes can be compared).

The two sides alternate pass by pass (which one first alternating) over N repetitions after a
warm-up, so machine noise hits both alike. Reported: the fastest and the median pass of each
side, examples/s and rows/s (rows as the store counts them: every token position, padding
included, for text; one per image), and the ratio of extraction to forward throughput
(target: at least 0.95).

Then the writer alone: float16 arrays already in memory (4 read-outs of 65536 x 768) appended
to a ``ShardWriter`` and closed, uncompressed and with zstd, against ``numpy.tofile`` of the
same bytes to the same disk, each followed by ``os.sync()`` so all reach the disk, alternating,
fastest of each; and the bytes zstd stores against the uncompressed shard.

The last line is JSON: ``extract_over_forward`` (the lower of the two models' ratios) and
``writer_over_disk``, with zstd's speed and stored bytes relative to no compression.

Run from the repository root:

    .venv/bin/python benchmarks/extract_throughput.py              # about 2 min on 2 cores
    .venv/bin/python benchmarks/extract_throughput.py --quick      # about 1 min
"""

from __future__ import annotations

import argparse
import json
import os
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
from workflow_scripts.options.extract import ExtractOptions  # noqa: E402

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
TYPED = ExtractOptions(**OPTIONS)  # as the extract stage receives them

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
        len(_kept_positions(p, e, TYPED)) for b in batches for p, e in zip(b.padding, b.example_id)
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


def forward_pass(adapter, batches, device) -> float:
    t = time.perf_counter()
    for batch in batches:
        forward_batch(adapter, batch, device)
    return time.perf_counter() - t


def extraction_pass(adapter, batches, rows, device, path: Path) -> float:
    t = time.perf_counter()
    writer = new_writer(adapter, rows, path)
    for batch in batches:
        _write_batch(adapter, batch, writer, device, TYPED)
    writer.close({"benchmark": True})
    seconds = time.perf_counter() - t
    shutil.rmtree(path)  # untimed; keeps the temporary directory small
    return seconds


def writer_over_disk(work: Path, repeats: int, rows: int = 65536, width: int = 768) -> dict:
    """The writer alone, uncompressed and with zstd, against numpy.tofile of the same float16
    bytes to the same disk; and the bytes zstd stores."""
    from workflow_scripts.models.adapter import Readout

    readouts = [Readout(k, 0, k, f"block.{k}", width) for k in range(4)]
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((rows, width), np.float32).astype(np.float16) for _ in readouts]
    index = (np.arange(rows), np.zeros(rows, np.int32), np.zeros(rows, bool))
    batch = 8192
    times = {"none": [], "zstd": [], "disk": []}
    stored = {}
    for r in range(repeats):
        sides = list(times) if r % 2 == 0 else list(reversed(times))
        for side in sides:
            target = work / f"writer-{side}"
            t = time.perf_counter()
            if side == "disk":
                target.mkdir()
                for k, a in enumerate(arrays):
                    a.tofile(target / f"layer-{k}")
                for name, i in zip(("example_id", "position", "is_padding"), index):
                    i.tofile(target / name)
            else:
                writer = ShardWriter(target, readouts, rows, "float16", 1024, 8, side)
                for start in range(0, rows, batch):
                    part = slice(start, start + batch)
                    writer.append([a[part] for a in arrays], *(i[part] for i in index))
                writer.close({"benchmark": True})
            os.sync()  # on the disk, not only in the page cache
            times[side].append(time.perf_counter() - t)
            stored[side] = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
            shutil.rmtree(target)
    mib = sum(a.nbytes for a in arrays) / 2**20
    best = {side: min(t) for side, t in times.items()}
    print(
        f"\n== writer alone: {mib:.0f} MiB of float16 in 4 read-outs (Gaussian): ShardWriter "
        f"{mib / best['none']:.0f} MiB/s uncompressed, {mib / best['zstd']:.0f} MiB/s with zstd "
        f"(stored {stored['zstd'] / stored['none']:.3f}x the uncompressed bytes); numpy.tofile "
        f"{mib / best['disk']:.0f} MiB/s"
    )
    return {
        "writer_over_disk": best["disk"] / best["none"],
        "zstd_speed_over_none": best["none"] / best["zstd"],
        "zstd_stored_over_none": stored["zstd"] / stored["none"],
    }


def batch_rows(batch: Batch) -> int:
    """The rows one batch gives in the store."""
    if batch.padding is None:
        return len(batch.example_id)
    return sum(len(_kept_positions(p, e, TYPED)) for p, e in zip(batch.padding, batch.example_id))


def measure(key: str, name: str, adapter, batches, rows: int, repeats: int, work: Path) -> float:
    device = torch.device(OPTIONS["device"])
    adapter.to(device)
    examples = sum(len(b.example_id) for b in batches)
    readouts = adapter.readouts
    stored = rows * sum(r.width for r in readouts) * np.dtype(OPTIONS["dtype"]).itemsize
    print(
        f"\n== {name}: {examples} examples in {len(batches)} batches, {rows} rows, "
        f"{len(readouts)} read-outs, {stored / 2**20:.1f} MiB of {OPTIONS['dtype']} per pass"
    )
    # warm-up: one batch of each side (allocator, kernels, Zarr imports)
    forward_pass(adapter, batches[:1], device)
    extraction_pass(adapter, batches[:1], batch_rows(batches[0]), device, work / f"{key}-w.zarr")
    totals = {"forward": [], "extraction": []}
    for r in range(repeats):
        for side in ("forward", "extraction") if r % 2 == 0 else ("extraction", "forward"):
            if side == "forward":
                totals[side].append(forward_pass(adapter, batches, device))
            else:
                totals[side].append(
                    extraction_pass(adapter, batches, rows, device, work / f"{key}.zarr")
                )
        print(
            f"  repetition {r + 1}/{repeats}: forward {totals['forward'][-1]:.2f} s, "
            f"extraction {totals['extraction'][-1]:.2f} s"
        )
    best = {side: min(times) for side, times in totals.items()}
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
    verdict = "ok" if ratio_best >= 0.95 else "BELOW TARGET"
    print(
        f"  ratio extraction/forward throughput: {ratio_best:.3f} (best), "
        f"{ratio_median:.3f} (median)  [target >= 0.95: {verdict}]"
    )

    return ratio_best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run: 96 text examples, 96 images (three batches each), 2 repetitions",
    )
    parser.add_argument("--text-examples", type=int, help="corpus examples (default 192)")
    parser.add_argument("--images", type=int, help="224x224 images (default 128)")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--only", choices=["gpt2", "resnet"], help="run one model only")
    args = parser.parse_args(argv)
    text_examples = args.text_examples or (96 if args.quick else 192)
    images = args.images or (96 if args.quick else 128)
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
            )
        writer = writer_over_disk(work, max(2, repeats))
    print(
        "\nsummary: "
        + ", ".join(f"{k} ratio {v:.3f}" for k, v in ratios.items())
        + f", writer over disk {writer['writer_over_disk']:.3f}; total "
        f"{time.perf_counter() - started:.0f} s"
    )
    print(
        json.dumps(
            {
                **{f"{k}_extract_over_forward": round(v, 3) for k, v in ratios.items()},
                "extract_over_forward": round(min(ratios.values()), 3),
                **{k: round(v, 3) for k, v in writer.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
