"""One GPU check for the day a GPU is lent: four parts, each timed side by side in one run.

Everything is built on the machine from code (random-initialised models from transformers
configs and the workflow's own builders, data made on the fly); nothing is downloaded. Every
ratio is a throughput ratio (the first side's rate over the second's: above 1, the first is
faster). Each part runs in its own try/except: a part that raises prints its traceback and is
marked FAILED, one that the time guard leaves out is SKIPPED, and the rest still run.

(a) extraction of a ~1B-parameter bfloat16 decoder (``transformers.LlamaConfig``: hidden 2048,
    16 layers, 32 heads with 8 key-value heads, intermediate 8192, vocabulary 32000, untied:
    1.10B parameters, printed), on batches of 8192 random tokens (16 x 512), side by side:

      forward     ``adapter.forward`` (the decoder family's adapter) under inference mode;
      extraction  ``extract._write_batch`` of every batch into a real float16 ``ShardWriter``
                  on local disk (the stage's default chunking, uncompressed), from the writer's
                  creation to its ``close`` and then ``os.sync()``, so the bytes are on the disk
                  (the writer does not fsync; the time to ``close`` alone is printed too);
      disk        the same number of bytes written to the same folder with ``os.write`` in
                  64 MiB blocks and ``os.fsync``: the disk's write rate (MB/s);

    reported: tokens/s of forward and extraction, MB/s of extraction and disk, and
    ``extract_over_forward`` (tokens/s) and ``extract_over_disk`` (bytes/s). Extraction and disk
    passes alternate; the fastest of each counts, and the forward is the median batch.

(b) ``layer_stats.compute`` (the layer_stats stage's function: one read-out of a stored shard,
    every statistic, one dense Haar rotation, the schema's default options) on a synthetic
    200,000 x 2048 float16 layer (Gaussian with two outlier features, 128 rows per example,
    written with ``ShardWriter``) with ``device: cuda`` against ``device: cpu`` (torch on every
    core), after an untimed warm-up on a small layer. The two sets of records must agree
    (relative 1e-3); ``stats_cuda_over_cpu`` is the speedup.

(c) training of a ResNet-50-shaped network (the workflow's resnet family: bottleneck
    [3, 4, 6, 3], ImageNet stem, BatchNorm, 1000 labels; SGD with momentum, bfloat16 autocast
    as configs/full.yaml trains its ResNets, batches of 256) on 2000 random JPEGs of 500 x 375
    written on the fly in ImageNet's folder layout and prepared by the prepare_data stage
    (``imagefolder:``) into the stored Parquet layout; fed by the training stage's own loader
    (``loaders.ImageExamples`` + ``EpochOrder`` + ``StepBatches`` through ``batches.loader``:
    decoding and RandomResizedCrop in cores - 1 worker processes, pinned memory) against the
    same steps fed batches already on the GPU (the loader's first batches, kept there). The step
    is ``train.train``'s (``on_device``, ``forward``, GradScaler, clipping, optimizer, schedule).
    ``loader_over_resident``: images/s of the first over the second.

(d) the ~1B decoder of (a), stored with ``models.save_model``, extracted by the stage function
    ``extract.extract`` split over the GPU and the CPU by accelerate (``Placement(device_map=
    "auto", max_memory={0: <half the weights + the largest block>, "cpu": "64GiB"})``:
    accelerate keeps room on the GPU for one offloaded module, so about half the weights stay
    there; the share of the parameters on each device is printed) against the same model whole
    on the GPU (no placement), on the same text dataset (long built-in corpus texts, 16 x 512
    tokens per batch, a sample of 16 rows per example stored so that the disk does not set the
    pace). The extraction loop is timed from the second batch's ``_write_batch`` call to the
    end (model loading, tokenization and the first batch left out); both shards must hold the
    same streams (max |d| / rms <= 5e-2 per read-out, identical index arrays).
    ``split_over_whole``: tokens/s of the split over the whole.

The last line is JSON: those five ratios, ``extract_page_cache_over_forward`` (extraction timed
to ``close``, its bytes left in the page cache), the parameter count, and whether the two
agreement checks passed (``stats_agree``, ``split_agree``); a part that failed or was skipped
gives null. Peak GPU memory is printed with (a), (c) and (d).

``--budget-seconds`` (default 420, so that with imports and clean-up the run stays within 8
minutes) guards the whole run: each part gets a share of the time left, its timing loops stop
when its share is spent (after a minimum of iterations), and a part that starts with less than
20 s left is skipped. Single calls (a stage function over a whole layer or shard) are not
interrupted. Temporary files (up to ~4 GB at a time) go to ``--work`` (default: the system's
temporary folder); its filesystem is printed, with a warning where it is in memory (tmpfs),
since the disk's rate is then memory's.

Run from the repository root:

    .venv/bin/python benchmarks/gpu_check.py                        # one H100: under 8 min
    .venv/bin/python benchmarks/gpu_check.py --work /scratch/me     # temporary files there
    .venv/bin/python benchmarks/gpu_check.py --only a c             # some parts only
    .venv/bin/python benchmarks/gpu_check.py --quick --device cpu   # tiny shapes on the CPU:
                                                                    # the harness, ~25 s on 2 cores

With ``--device cpu`` every part takes its CPU path (no pinned memory, no CUDA events, no
autocast; the split of (d) is over the CPU and accelerate's disk offload, ``max_memory={"cpu":
<half the weights + the largest block>}``, since there is no GPU to split over): the numbers
test the harness, not the hardware. On a busy machine pass ``--threads 1``: two torch threads
on two loaded cores made the tiny ResNet's steps a hundred times slower.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflow_scripts import extract as extract_stage  # noqa: E402
from workflow_scripts import loaders, prepare_data  # noqa: E402
from workflow_scripts import train as train_stage  # noqa: E402
from workflow_scripts.activations import ShardWriter, open_shard  # noqa: E402
from workflow_scripts.batches import Batch, autocast, loader  # noqa: E402
from workflow_scripts.data import builtin, store  # noqa: E402
from workflow_scripts.layer_stats import compute as layer_statistics  # noqa: E402
from workflow_scripts.models import family_module, save_model  # noqa: E402
from workflow_scripts.models.adapter import Readout  # noqa: E402
from workflow_scripts.models.builtin_tokenizer import builtin_tokenizer  # noqa: E402
from workflow_scripts.options.extract import ExtractOptions  # noqa: E402
from workflow_scripts.options.stats import StatsOptions  # noqa: E402

PARTS = ("a", "b", "c", "d")
TITLES = {
    "a": "extraction of a ~1B bfloat16 decoder vs its forward and the disk",
    "b": "layer_stats on the device vs the CPU",
    "c": "ResNet-50 training: the stage's DataLoader on JPEGs vs batches on the device",
    "d": "extraction of the decoder split over GPU and CPU vs whole on the GPU",
}
# the share of the time left that each part gets when it starts (over the parts still to run)
WEIGHTS = {"a": 0.3, "b": 0.2, "c": 0.3, "d": 0.2}
RATIO_KEYS = (
    "extract_over_forward",
    "extract_over_disk",
    "stats_cuda_over_cpu",
    "loader_over_resident",
    "split_over_whole",
)

# (full, quick) shapes
SHAPES = {
    # (a), (d): the decoder (Llama-3.2-1B's layout, a 32000 vocabulary) and its batches
    "hidden": (2048, 64),
    "layers": (16, 2),
    "heads": (32, 4),
    "kv_heads": (8, 2),
    "intermediate": (8192, 256),
    "vocab": (32000, 1000),
    "seq": (512, 64),  # tokens per example
    "tokens": (8192, 256),  # tokens per batch
    "forward_iterations": (10, 3),
    "extract_batches": (6, 2),  # batches per extraction pass
    "repeats": (2, 1),  # alternating extraction / disk passes
    # (b)
    "stats_rows": (200_000, 4096),
    "stats_width": (2048, 256),
    # (c)
    "images": (2000, 48),
    "image_size": ((500, 375), (48, 40)),
    "classes": (10, 4),  # class folders (the model has 1000 labels)
    "resize": (256, 36),
    "crop": (224, 32),
    "resnet_layers": ([3, 4, 6, 3], [1, 1, 1, 1]),
    "resnet_widths": ([64, 128, 256, 512], [8, 16, 32, 64]),
    "train_batch": (256, 8),
    "train_steps": (20, 3),
    "train_warmup": (5, 1),
    # (d)
    "split_batches": (12, 3),
    "split_rows_per_example": (16, 8),
}
EXTRACT_DEFAULTS = {  # the schema's defaults (device and batch shape set per part)
    "dtype": "float16",
    "padding": "longest",
    "rows_per_example": None,
    "autocast": None,
    "chunk_rows": 1024,
    "chunks_per_shard": 8,
    "compression": "none",
    "gpt2_final_readout": "raw",
    "seed": 0,
}
STATS_DEFAULTS = {  # the schema's defaults
    "include_padding": False,
    "average": "rows",
    "rms": "row_mean",
    "rotations": 1,
    "rotation": "haar",
    "seed": 0,
    "top_features": 5,
}
STATS_RTOL = 1e-3
SPLIT_TOLERANCE = 5e-2  # max |split - whole| / rms(whole), per read-out (bfloat16 model)

ROWS: list[dict] = []  # the summary table
STATUS: dict[str, str] = {}
RESULT: dict = dict.fromkeys(
    (*RATIO_KEYS, "extract_page_cache_over_forward", "parameters", "stats_agree", "split_agree")
)


# --- helpers ---------------------------------------------------------------------------------


class Budget:
    """The run's deadline, and each part's share of the time left."""

    def __init__(self, seconds: float, parts: list[str], minimum: float):
        self.start = time.perf_counter()
        self.end = self.start + seconds
        self.waiting = list(parts)
        self.minimum = minimum  # a part starting with less than this left is skipped
        self.part_end = self.end

    def left(self) -> float:
        return self.end - time.perf_counter()

    def begin(self, part: str) -> bool:
        """Start ``part``: False where too little time is left for it."""
        weights = sum(WEIGHTS[p] for p in self.waiting)
        share = self.left() * WEIGHTS[part] / weights
        self.waiting.remove(part)
        self.part_end = time.perf_counter() + share
        return self.left() >= self.minimum

    def spent(self) -> bool:
        """Whether the current part's share (or the whole run's time) is used up."""
        return time.perf_counter() >= min(self.part_end, self.end)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def quiet():
    """The stages' progress bars and log lines go to a buffer (printed if the stage fails)."""
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        try:
            yield
        except BaseException:
            sys.stdout.write(buffer.getvalue()[-4000:])
            raise


def filesystem(path: Path) -> str:
    """The type of the filesystem that holds ``path`` (from /proc/mounts), and its mount point."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    point, kind = max(
        ((p, k) for p, k in mounts if resolved == p or resolved.startswith(p.rstrip("/") + "/")),
        key=lambda m: len(m[0]),
        default=("?", "unknown"),
    )
    return f"{kind} at {point}"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def record(part: str, case: str, rate: float, unit: str, ratio=None, note: str = "") -> None:
    note = "; ".join(p for p in note.split("; ") if p)
    ROWS.append(
        {"part": part, "case": case, "rate": rate, "unit": unit, "ratio": ratio, "note": note}
    )
    ratio_text = f"   ratio {ratio:.3f}" if ratio is not None else ""
    print(f"  {case:<44}{rate:>14,.1f} {unit:<7}{ratio_text}  {note}", flush=True)


def extract_options(device: torch.device, **changes) -> ExtractOptions:
    return ExtractOptions(**{**EXTRACT_DEFAULTS, "device": device.type, **changes})


class Decoder:
    """The ~1B Llama-shaped decoder, built once on the device in bfloat16 (parts a and d), and
    its stored copy (part d)."""

    def __init__(self, args, device: torch.device, work: Path):
        self.args, self.device, self.work = args, device, work
        self.model = None
        self.directory: Path | None = None
        self.tokenizer = builtin_tokenizer("gpt2")  # 135 words; part a draws ids over the vocab

    def get(self):
        if self.model is None:
            import transformers

            a = self.args
            config = transformers.LlamaConfig(
                vocab_size=a.vocab,
                hidden_size=a.hidden,
                num_hidden_layers=a.layers,
                num_attention_heads=a.heads,
                num_key_value_heads=a.kv_heads,
                intermediate_size=a.intermediate,
                max_position_embeddings=max(2048, a.seq),
                tie_word_embeddings=False,
            )
            torch.manual_seed(0)
            started = time.perf_counter()
            with torch.device(self.device):  # initialised where it runs
                model = transformers.LlamaForCausalLM(config)
            self.model = model.to(dtype=torch.bfloat16).eval()
            sync(self.device)
            parameters = sum(p.numel() for p in self.model.parameters())
            modules = [self.model.model.embed_tokens, self.model.lm_head, *self.model.model.layers]
            # the largest module, which accelerate keeps room for on the main device
            self.largest_bytes = max(
                sum(p.numel() * p.element_size() for p in m.parameters()) for m in modules
            )
            RESULT["parameters"] = parameters
            print(
                f"  Llama decoder {a.layers} x {a.hidden} ({a.heads} heads, {a.kv_heads} key-value "
                f"heads, intermediate {a.intermediate}, vocabulary {a.vocab}, untied): "
                f"{parameters:,} parameters, bfloat16, built on {self.device} in "
                f"{time.perf_counter() - started:.1f} s",
                flush=True,
            )
        return self.model

    def stored(self) -> Path:
        """The model in the stored layout (``models.save_model``, family ``decoder``); the
        in-memory copy is released."""
        if self.directory is None:
            model = self.get()
            directory = self.work / "decoder-1b"
            started = time.perf_counter()
            with quiet():
                save_model(model, self.tokenizer, "decoder", directory, source="init:benchmark")
            self.directory = directory
            weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
            self.weight_bytes = weights
            print(
                f"  stored with models.save_model: {weights / 2**30:.2f} GiB of weights in "
                f"{time.perf_counter() - started:.1f} s",
                flush=True,
            )
        self.release()
        return self.directory

    def release(self) -> None:
        self.model = None
        free(self.device)


# --- (a) extraction against the forward and the disk -----------------------------------------


def write_bytes(path: Path, nbytes: int, block: memoryview) -> float:
    """Seconds to write ``nbytes`` to a new file with os.write and fsync it."""
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < nbytes:
            written += os.write(fd, block[: min(len(block), nbytes - written)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def part_a(args, device: torch.device, work: Path, budget: Budget, decoder: Decoder) -> None:
    model = decoder.get()
    adapter = family_module("decoder").adapter(model, decoder.tokenizer, "decoder", "raw")
    examples, seq = args.tokens // args.seq, args.seq
    generator = torch.Generator().manual_seed(0)
    batches = []
    for b in range(args.extract_batches):
        ids = torch.randint(args.vocab, (examples, seq), generator=generator)
        batches.append(
            Batch(
                {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                np.arange(b * examples, (b + 1) * examples),
                np.zeros((examples, seq), bool),
                None,
            )
        )
    tokens = examples * seq
    options = extract_options(device, batch_size=examples, max_tokens=seq)
    width = sum(r.width for r in adapter.readouts)
    where = filesystem(work)
    print(
        f"  {len(batches)} batches of {examples} x {seq} tokens; {len(adapter.readouts)} "
        f"read-outs x {args.hidden} = {tokens * width * 2 / 2**20:.1f} MiB of float16 a batch; "
        f"written to {work} ({where})",
        flush=True,
    )
    if where.startswith(("tmpfs", "ramfs")):
        print("  WARNING: that folder is in memory, not on a disk: pass --work on a disk")

    def forward(batch):
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.inputs.items()}
        with torch.inference_mode():
            adapter.forward(inputs)

    def new_writer(path, rows):
        return ShardWriter(
            path,
            adapter.readouts,
            rows,
            options.dtype,
            options.chunk_rows,
            options.chunks_per_shard,
            options.compression,
        )

    # warm-up: kernels, the pinned-memory cache, Zarr
    reset_peak(device)
    forward(batches[0])
    writer = new_writer(work / "warm.zarr", tokens)
    extract_stage._write_batch(adapter, batches[0], writer, device, options)
    writer.close({"benchmark": True})
    shutil.rmtree(work / "warm.zarr")

    times = []
    for i in range(args.forward_iterations):
        batch = batches[i % len(batches)]
        sync(device)
        started = time.perf_counter()
        forward(batch)
        sync(device)
        times.append(time.perf_counter() - started)
        if i >= 1 and budget.spent():
            break
    forward_rate = tokens / statistics.median(times)

    def extraction(path: Path) -> tuple[float, float, int]:
        os.sync()  # nothing earlier waits to be written
        started = time.perf_counter()
        writer = new_writer(path, tokens * len(batches))
        for batch in batches:
            extract_stage._write_batch(adapter, batch, writer, device, options)
        writer.close({"benchmark": True})
        closed = time.perf_counter() - started
        os.sync()
        synced = time.perf_counter() - started
        stored = folder_bytes(path)
        shutil.rmtree(path)
        return closed, synced, stored

    block = memoryview(np.random.default_rng(0).bytes(64 << 20))
    closed, synced, disk = [], [], []
    stored = tokens * len(batches) * width * 2
    for r in range(args.repeats):
        for side in ("extraction", "disk") if r % 2 == 0 else ("disk", "extraction"):
            if side == "extraction":
                c, s, stored = extraction(work / "extract.zarr")
                closed.append(c)
                synced.append(s)
            else:
                os.sync()
                disk.append(write_bytes(work / "disk.bin", stored, block))
        print(
            f"  repetition {r + 1}: extraction {synced[-1]:.2f} s ({closed[-1]:.2f} s to close), "
            f"disk {disk[-1]:.2f} s for {stored / 1e6:,.1f} MB",
            flush=True,
        )
        if budget.spent():
            break
    rows = tokens * len(batches)
    extract_rate = rows / min(synced)
    page_cache_rate = rows / min(closed)
    extract_mb = stored / min(synced) / 1e6
    disk_mb = stored / min(disk) / 1e6
    record("a", "forward (adapter.forward)", forward_rate, "tok/s", note=peak_gib(device))
    record(
        "a",
        "extraction, to close + sync",
        extract_rate,
        "tok/s",
        extract_rate / forward_rate,
        "x forward",
    )
    record(
        "a",
        "extraction, to close (page cache)",
        page_cache_rate,
        "tok/s",
        page_cache_rate / forward_rate,
        "x forward",
    )
    record("a", "extraction bytes, to close + sync", extract_mb, "MB/s", extract_mb / disk_mb)
    record("a", "disk (os.write + fsync)", disk_mb, "MB/s", note=f"{stored / 1e6:,.1f} MB; {where}")
    RESULT["extract_over_forward"] = extract_rate / forward_rate
    RESULT["extract_over_disk"] = extract_mb / disk_mb
    RESULT["extract_page_cache_over_forward"] = page_cache_rate / forward_rate


# --- (b) layer_stats on the device against the CPU -------------------------------------------


def write_layer(path: Path, rows: int, width: int, tokens: int = 128) -> Path:
    """A float16 layer: Gaussian with two outlier features, ``tokens`` rows per example."""
    rng = np.random.default_rng(0)
    readout = Readout(0, 0, 0, "block", width)
    writer = ShardWriter(path, [readout], rows, "float16", 1024, 8)
    for start in range(0, rows, 8192):
        n = min(8192, rows - start)
        x = rng.standard_normal((n, width), dtype=np.float32)
        x[:, [7, width // 3]] *= 40
        position = start + np.arange(n)
        writer.append(
            [x.astype(np.float16)], position // tokens, position % tokens, np.zeros(n, bool)
        )
    writer.close({"readouts": [readout.as_dict()], "dtype": "float16"})
    return path


def part_b(args, device: torch.device, work: Path, budget: Budget) -> None:
    started = time.perf_counter()
    layer = write_layer(work / "stats-layer.zarr", args.stats_rows, args.stats_width)
    small = write_layer(work / "stats-warm.zarr", min(args.stats_rows, 8192), args.stats_width)
    print(
        f"  layer of {args.stats_rows:,} x {args.stats_width} float16 written in "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )
    thresholds = [6.0, 10.0]
    on_device = StatsOptions(**STATS_DEFAULTS, device=device.type)
    on_cpu = StatsOptions(**STATS_DEFAULTS, device="cpu")
    tf32 = torch.backends.cuda.matmul.allow_tf32  # compute turns it off; put back after

    def timed(options):
        sync(device)
        started = time.perf_counter()
        with quiet():
            frame = layer_statistics([layer], 0, thresholds, options)
        sync(device)
        return time.perf_counter() - started, frame

    try:
        with quiet():
            layer_statistics([small], 0, thresholds, on_device)  # warm-up
        device_times, cpu_times = [], []
        for r in range(2):  # alternating, the same number of runs each
            for options in (on_device, on_cpu) if r == 0 else (on_cpu, on_device):
                seconds, frame = timed(options)
                if options is on_device:
                    device_times.append(seconds)
                    device_frame = frame
                else:
                    cpu_times.append(seconds)
                    cpu_frame = frame
            if budget.spent():
                break
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    same_records = list(device_frame[["metric", "setting"]].itertuples(index=False)) == list(
        cpu_frame[["metric", "setting"]].itertuples(index=False)
    )
    a = device_frame["value"].to_numpy(np.float64)
    c = cpu_frame["value"].to_numpy(np.float64)
    close = same_records and np.allclose(a, c, rtol=STATS_RTOL, atol=1e-6, equal_nan=True)
    finite = np.isfinite(a) & np.isfinite(c)
    worst = float(np.max(np.abs(a - c)[finite] / np.maximum(np.abs(c[finite]), 1e-12)))
    rows = args.stats_rows
    cpu_rate = rows / min(cpu_times)
    device_rate = rows / min(device_times)
    record(
        "b",
        "layer_stats.compute, device cpu",
        cpu_rate,
        "rows/s",
        note=f"{torch.get_num_threads()} threads; best of {len(cpu_times)}",
    )
    record(
        "b",
        f"layer_stats.compute, device {device.type} (--device)",
        device_rate,
        "rows/s",
        device_rate / cpu_rate,
        f"x cpu; best of {len(device_times)}; {len(a)} records, max rel. diff {worst:.1e} "
        f"({'agree' if close else 'DISAGREE'} at rtol {STATS_RTOL:g})",
    )
    RESULT["stats_cuda_over_cpu"] = device_rate / cpu_rate
    RESULT["stats_agree"] = bool(close)
    if not close:
        STATUS["b"] = "MISMATCH"


# --- (c) training through the DataLoader against batches on the device ------------------------


def _write_jpegs(job) -> int:
    """JPEGs ``first`` to ``stop`` of ``root`` (ImageNet's layout: one folder per class):
    smooth random colour fields with noise, so their size is near a photograph's."""
    from PIL import Image

    root, first, stop, classes, size = job
    width, height = size
    total = 0
    for i in range(first, stop):
        rng = np.random.default_rng(i)
        coarse = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        noisy = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        folder = Path(root) / f"n{i % classes:08d}"
        folder.mkdir(exist_ok=True)
        path = folder / f"ILSVRC2012_val_{i:08d}.JPEG"
        Image.fromarray(noisy).save(path, quality=90)
        total += path.stat().st_size
    return total


def make_jpegs(root: Path, images: int, classes: int, size, workers: int) -> int:
    root.mkdir()
    for c in range(classes):
        (root / f"n{c:08d}").mkdir()
    step = max(1, -(-images // max(1, workers * 4)))
    jobs = [(str(root), s, min(s + step, images), classes, size) for s in range(0, images, step)]
    if workers <= 1:
        return sum(map(_write_jpegs, jobs))
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(_write_jpegs, jobs))


def part_c(args, device: torch.device, work: Path, budget: Budget) -> None:
    cores = args.cores
    workers = max(0, cores - 1)  # the main process keeps one core, as train.run does
    started = time.perf_counter()
    root = work / "imagenet"
    jpeg_bytes = make_jpegs(root, args.images, args.classes, args.image_size, cores)
    parquet = work / "imagenet.parquet"
    with quiet():
        prepare_data.prepare({"source": f"imagefolder:{root}"}, parquet, "imagenet", cores)
    print(
        f"  {args.images} random JPEGs of {args.image_size[0]} x {args.image_size[1]} "
        f"({jpeg_bytes / args.images / 1e3:.0f} kB each) in {args.classes} class folders, "
        f"prepared (imagefolder:) in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    precision = "bfloat16"  # autocast on CUDA only (batches.autocast), as configs/full.yaml
    spec = {
        "kind": "image_classification",
        "num_labels": 1000,
        "arch": {
            "block": "bottleneck",
            "layers": args.resnet_layers,
            "widths": args.resnet_widths,
            "stem": "imagenet",
        },
        "seed": 0,
        "batch_size": args.train_batch,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        "warmup_steps": 0,
        "schedule": "constant",
        "clip_grad_norm": 1.0,
        "steps": args.train_warmup + args.train_steps,
        "mixed_precision": precision,
    }
    model, _, _ = train_stage.build(spec, None)
    preprocess = {**model.config["preprocess"], "resize": args.resize, "crop": args.crop}
    parameters = sum(p.numel() for p in model.parameters())
    model.to(device).train()
    optimizer = train_stage.make_optimizer(model, spec["optimizer"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: train_stage.learning_rate(s, spec)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bfloat16: no loss scaling
    print(
        f"  ResNet bottleneck {args.resnet_layers}, widths {args.resnet_widths}: "
        f"{parameters / 1e6:.1f} M parameters; batches of {args.train_batch} at "
        f"{args.crop} x {args.crop}, "
        f"{precision + ' autocast' if device.type == 'cuda' else 'float32 (no autocast on cpu)'}; "
        f"{workers} loader workers",
        flush=True,
    )

    def step(batch: dict, index: int) -> None:
        """One step of train.train's loop."""
        batch = train_stage.on_device(batch, device, preprocess)
        torch.manual_seed(spec["seed"] * 1_000_003 + index)
        with autocast(device, precision):
            loss, _, _ = train_stage.forward(model, spec["kind"], batch)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss {loss.item()} at step {index}")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        float(torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip_grad_norm"]))
        loss.item()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

    examples = loaders.ImageExamples(parquet, preprocess, spec["seed"])
    held_out = loaders.held_out_rows(examples.rows, 0.01, spec["seed"], examples.row_group_rows)
    order = loaders.EpochOrder(
        examples.rows,
        held_out,
        spec["seed"],
        examples.group_starts,
        loaders.window_groups(spec["batch_size"], examples.row_group_rows),
    )
    batches = loader(
        loaders.StepBatches(examples, order, spec["batch_size"], 0, spec["steps"]),
        workers,
        device.type == "cuda",
    )
    resident: list[dict] = []
    reset_peak(device)
    fed = 0
    clock = None
    for index, batch in enumerate(batches):
        if index < args.train_warmup:  # warm-up: workers start; these batches stay resident
            resident.append({k: v.to(device).clone() for k, v in batch.items()})
        step(batch, index)
        if index == args.train_warmup - 1:  # timed from here: fetching and stepping
            sync(device)
            clock = time.perf_counter()
        elif clock is not None:
            fed += 1
            if fed >= 2 and budget.spent():
                break
    sync(device)
    loader_seconds = time.perf_counter() - clock
    del batches
    loader_rate = fed * args.train_batch / loader_seconds

    step(resident[0], 0)  # warm-up
    sync(device)
    clock = time.perf_counter()
    for i in range(fed):
        step(resident[i % len(resident)], i)
    sync(device)
    resident_rate = fed * args.train_batch / (time.perf_counter() - clock)
    record(
        "c",
        "train steps, batches already on the device",
        resident_rate,
        "img/s",
        note=f"{fed} steps; {peak_gib(device)}",
    )
    record(
        "c",
        f"train steps, DataLoader ({workers} workers)",
        loader_rate,
        "img/s",
        loader_rate / resident_rate,
        f"x resident; {fed} steps",
    )
    RESULT["loader_over_resident"] = loader_rate / resident_rate


# --- (d) a model split over the GPU and the CPU against it whole ------------------------------


def long_texts(path: Path, examples: int, words: int) -> Path:
    """A text dataset of ``examples`` long texts (built-in corpus sentences run together, at
    least ``words`` words each)."""
    per = max(1, math.ceil(words / 30) + 2)  # a corpus text has 30-40 words
    frame = builtin.generate("corpus", examples * per, seed=0)
    texts = [" ".join(frame["text"][i * per : (i + 1) * per]) for i in range(examples)]
    import pandas as pd

    store.write(
        pd.DataFrame({"example_id": np.arange(examples, dtype=np.int64), "text": texts}),
        path,
        "text",
        None,
    )
    return path


def timed_extract(model_dir, data, out, options, placement) -> tuple[float, int, float]:
    """``extract.extract`` of the whole dataset (one shard): seconds of its loop from the
    second batch on (or the whole call, where it has fewer than three batches), the batches
    that covers, and the whole call's seconds."""
    calls: list[float] = []
    original = extract_stage._write_batch

    def counted(*args, **kwargs):
        calls.append(time.perf_counter())
        return original(*args, **kwargs)

    extract_stage._write_batch = counted
    named = {} if placement is None else {"placement": placement}
    try:
        started = time.perf_counter()
        with quiet():
            extract_stage.extract(model_dir, data, 0, 1, out, options, dtype="bfloat16", **named)
        ended = time.perf_counter()
    finally:
        extract_stage._write_batch = original
    if len(calls) >= 3:
        return ended - calls[1], len(calls) - 1, ended - started
    return ended - started, len(calls), ended - started


def device_shares(model) -> str:
    """Parameters per device of a model placed by accelerate (its ``hf_device_map``)."""
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return "not placed by accelerate"
    shares: dict[str, int] = {}
    for name, where in placed.items():
        module = model.get_submodule(name) if name else model
        shares[str(where)] = shares.get(str(where), 0) + sum(p.numel() for p in module.parameters())
    total = sum(shares.values())
    return ", ".join(f"{where} {n / total:.0%}" for where, n in shares.items())


def part_d(args, device: torch.device, work: Path, budget: Budget, decoder: Decoder) -> None:
    from workflow_scripts.models import load_adapter
    from workflow_scripts.options.placement import Placement

    model_dir = decoder.stored()
    examples = args.tokens // args.seq
    data = long_texts(work / "long-texts.parquet", examples * args.split_batches, args.seq)
    options = extract_options(
        device,
        batch_size=examples,
        max_tokens=args.seq,
        rows_per_example=args.split_rows_per_example,
    )
    tokens = len(decoder.tokenizer(store.DatasetFile(data).read(0, 1)["text"][0])["input_ids"])
    if tokens < args.seq:
        raise RuntimeError(f"the texts have {tokens} tokens, fewer than {args.seq}")
    # about half the weights on the main device: accelerate keeps room there for the largest
    # module (an offloaded one runs there), so that much more
    cap = decoder.weight_bytes // 2 + decoder.largest_bytes
    if device.type == "cuda":
        max_memory = {device.index or 0: f"{cap // 2**20}MiB", "cpu": "64GiB"}
    else:  # no GPU to split over: about half on the CPU, the rest offloaded to disk
        max_memory = {"cpu": cap}
    placement = Placement(device_map="auto", max_memory=max_memory)
    print(
        f"  {args.split_batches} batches of {examples} x {args.seq} tokens, "
        f"{args.split_rows_per_example} rows per example stored; placement {placement}",
        flush=True,
    )

    # where accelerate puts the weights (a separate load: extract keeps its adapter)
    with quiet():
        adapter, _ = load_adapter(model_dir, "raw", "bfloat16", placement=placement)
    print(f"  split placement: {device_shares(adapter.model)}", flush=True)
    del adapter
    free(device)

    whole_out, split_out = work / "whole.zarr", work / "split.zarr"
    reset_peak(device)
    whole_s, batches, whole_call = timed_extract(model_dir, data, whole_out, options, None)
    whole_peak = peak_gib(device)
    free(device)
    reset_peak(device)
    split_s, split_batches, split_call = timed_extract(
        model_dir, data, split_out, options, placement
    )
    split_peak = peak_gib(device)
    free(device)
    if split_batches != batches:
        raise RuntimeError(f"the split run made {split_batches} timed batches, whole {batches}")

    whole, split = open_shard(whole_out), open_shard(split_out)
    names = [f"layer-{r['index']}" for r in whole.attrs["readouts"]]
    errors = []
    for name in names:
        w = whole[name][:].astype(np.float32)
        s = split[name][:].astype(np.float32)
        rms = max(float(np.sqrt(np.mean(w.astype(np.float64) ** 2))), 1e-12)
        errors.append(float(np.abs(s - w).max()) / rms if w.shape == s.shape else math.inf)
    index_same = all(
        np.array_equal(whole[n][:], split[n][:]) for n in ("example_id", "position", "is_padding")
    )
    worst = max(errors)
    agree = worst <= SPLIT_TOLERANCE and index_same
    rate = batches * examples * args.seq
    record(
        "d",
        "extract.extract, whole on the device",
        rate / whole_s,
        "tok/s",
        note=f"call {whole_call:.1f} s; {whole_peak}",
    )
    record(
        "d",
        "extract.extract, split by accelerate",
        rate / split_s,
        "tok/s",
        whole_s / split_s,
        f"x whole; call {split_call:.1f} s; {split_peak}; {len(names)} read-outs x "
        f"{whole[names[0]].shape[0]} rows, max |d|/rms {worst:.1e}, index arrays "
        f"{'identical' if index_same else 'DIFFER'} ({'agree' if agree else 'DISAGREE'})",
    )
    RESULT["split_over_whole"] = whole_s / split_s
    RESULT["split_agree"] = bool(agree)
    if not agree:
        STATUS["d"] = "MISMATCH"


# ---------------------------------------------------------------------------------------------


def print_summary(started: float, parts: list[str]) -> None:
    print("\n" + "=" * 100 + "\nSUMMARY")
    for part in parts:
        print(f"  ({part}) {STATUS.get(part, 'not run'):<10} {TITLES[part]}")
    print(f"\n  {'part':<5}{'case':<46}{'rate':>14} {'unit':<7}{'ratio':>8}  note")
    for row in ROWS:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(
            f"  {row['part']:<5}{row['case']:<46}{row['rate']:>14,.1f} {row['unit']:<7}"
            f"{ratio:>8}  {row['note']}"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes and few iterations: tests the harness"
    )
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=420.0,
        help="the parts' time (default 420, so that the run with its imports and clean-up "
        "stays within 8 minutes): parts stop early or are skipped to keep to it",
    )
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run these parts only")
    cores = len(os.sched_getaffinity(0))
    parser.add_argument(
        "--threads", type=int, default=cores, help=f"torch CPU threads (default {cores}, the cores)"
    )
    parser.add_argument("--work", help="folder for the temporary files (default: the system's)")
    args = parser.parse_args(argv)
    args.cores = cores  # processes: the JPEGs, prepare_data, the DataLoader's workers
    for key, (full, quick) in SHAPES.items():
        setattr(args, key, quick if args.quick else full)
    parts = list(args.only or PARTS)

    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
        + (
            f" ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
            if device.type == "cuda"
            else ""
        )
        + f", {torch.get_num_threads()} CPU threads, {'quick' if args.quick else 'full'} shapes, "
        f"budget {args.budget_seconds:.0f} s",
        flush=True,
    )
    started = time.perf_counter()
    budget = Budget(args.budget_seconds, parts, minimum=0 if args.quick else 20)
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.work) as tmp:
        work = Path(tmp)
        decoder = Decoder(args, device, work)
        runners = {
            "a": lambda: part_a(args, device, work, budget, decoder),
            "b": lambda: part_b(args, device, work, budget),
            "c": lambda: part_c(args, device, work, budget),
            "d": lambda: part_d(args, device, work, budget, decoder),
        }
        for part in parts:
            print(f"\n== ({part}) {TITLES[part]}", flush=True)
            if not budget.begin(part):
                STATUS[part] = "SKIPPED"
                print(f"  skipped: {budget.left():.0f} s of the budget left", flush=True)
                continue
            part_started = time.perf_counter()
            try:
                runners[part]()
                STATUS.setdefault(part, "ok")
            except Exception:
                traceback.print_exc(file=sys.stdout)
                STATUS[part] = "FAILED"
            print(f"  ({part}) {time.perf_counter() - part_started:.1f} s", flush=True)
            if part == "a" and "d" not in parts:
                decoder.release()
            free(device)
        decoder.release()
    print_summary(started, parts)
    print(
        json.dumps(
            {
                key: (float(f"{value:.4g}") if isinstance(value, float) else value)
                for key, value in RESULT.items()
            }
        )
    )


if __name__ == "__main__":
    main()
