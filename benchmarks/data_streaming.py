"""Memory and speed of the data path, at N and 10N rows, side by side in one run.

* peak RSS (the job's process and its workers, summed) of prepare_data, tokenize, train and
  extract on the built-in images (shapes) and text (corpus) at N and 10N rows: the ratio 10N / N
  per stage, which is 1 when memory is flat in the data;
* the training loader's images per second (decoded, RandomResizedCrop 224, flip) with 1 and 2
  DataLoader workers, on ImageNet-sized JPEGs made here;
* the share of a training step spent waiting for data, from the train job's own log (a
  ResNet-18-shaped model on the same JPEGs);
* prepare_data of an image folder of those JPEGs against plainly reading the same files (both
  from the page cache, read once before), and the stored bytes against the files' bytes.

    python benchmarks/data_streaming.py [--rows 20000] [--images 2000] [--workdir DIR]

Ends with one JSON line of the ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAIN_COMMON = {
    "seed": 0,
    "eval_fraction": 0.01,
    "eval_every": 1000,
    "checkpoint_every": 1000,
    "device": "cpu",
    "warmup_steps": 2,
    "schedule": "constant",
    "clip_grad_norm": 1.0,
    "max_tokens": 64,
    "mixed_precision": None,
}
SMALL_RESNET = {
    "block": "basic",
    "layers": [1, 1, 1, 1],
    "widths": [16, 32, 64, 128],
    "stem": "cifar",
    "norm": "rms",
}
EXTRACT = {
    "dtype": "float16",
    "batch_size": 64,
    "max_tokens": 64,
    "padding": "longest",
    "rows_per_example": 1,  # one row per example: the stored stream stays small at 10N
    "device": "cpu",
    "autocast": None,
    "chunk_rows": 4096,
    "chunks_per_shard": 4,
    "compression": "none",
    "gpt2_final_readout": "raw",
    "seed": 0,
}


def peak_rss(command: list[str], log: Path) -> tuple[float, float]:
    """(peak memory in MB of the process and its children, seconds) of a command. Memory is
    the sum of their proportional set sizes (PSS: pages shared by forked workers counted once)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=env, stderr=handle, stdout=handle)
    peak = 0.0
    done = threading.Event()

    def poll():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(process.pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=poll)
    watcher.start()
    code = process.wait()
    done.set()
    watcher.join()
    if code:
        raise RuntimeError(f"{' '.join(command)} failed; see {log}:\n{log.read_text()[-2000:]}")
    return peak / 2**20, time.perf_counter() - start


def _tree_rss(pid: int) -> float:
    """The PSS in bytes of ``pid`` and its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except (OSError, IndexError):
                continue
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        todo += children.get(current, [])
    return total


def stage(rule: str, threads: int, **values) -> list[str]:
    """The command that runs the stage of ``rule`` as its job would (workflow_scripts.stage)."""
    named = [f"{name}={value}" for name, value in values.items()]
    return [sys.executable, "-m", "workflow_scripts.stage", rule, *named, "--threads", str(threads)]


def stages(work: Path, rows: int) -> dict[str, float]:
    """Peak RSS (MB) of each stage on built-in data of ``rows`` rows."""
    from workflow_scripts import families

    work.mkdir(parents=True, exist_ok=True)
    peaks = {}
    for name, kind in (("shapes", "image"), ("corpus", "text")):
        data = work / f"{name}.parquet"
        spec = {"source": f"builtin:{name}", "rows": rows, "seed": 1}
        peaks[f"prepare_{kind}"], _ = peak_rss(
            stage("prepare_data", 2, spec=json.dumps(spec), name=name, out=data),
            work / f"prepare-{name}.log",
        )
        if kind == "text":
            tokens = work / "corpus.npy"
            style = families.get("gptr2").tokenizer
            peaks["tokenize_text"], _ = peak_rss(
                stage("tokenize", 2, data=data, model="", builtin=style, out=tokens),
                work / "tokenize.log",
            )
            run = {
                **TRAIN_COMMON,
                "kind": "causal_lm",
                "family": "gptr2",
                "arch": {"layers": 2, "width": 64, "heads": 2, "context": 64},
                "context": 64,
                "batch_size": 32,
                "steps": 30,
                "optimizer": {"name": "adam", "lr": 0.001},
            }
            train_data = tokens
        else:
            run = {
                **TRAIN_COMMON,
                "kind": "image_classification",
                "num_labels": 10,
                "arch": SMALL_RESNET,
                "batch_size": 64,
                "steps": 30,
                "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            }
            train_data = data
        model = work / f"model-{name}"
        peaks[f"train_{kind}"], _ = peak_rss(
            stage(
                "train",
                2,
                model=name,
                spec=json.dumps(run),
                data=train_data,
                base="",
                tokenizer="",
                checkpoint=work / f"{name}.pt",
                metrics=work / f"{name}-metrics.parquet",
                plot=work / f"{name}-loss.png",
                out=model,
            ),
            work / f"train-{name}.log",
        )
        peaks[f"extract_{kind}"], _ = peak_rss(
            stage(
                "extract",
                2,
                model=model,
                data=data,
                shard=0,
                shards=1,
                options=json.dumps(EXTRACT),
                out=work / f"{name}.zarr",
            ),
            work / f"extract-{name}.log",
        )
    return peaks


def make_jpegs(root: Path, count: int, classes: int = 10) -> int:
    """ImageNet-sized JPEGs (shorter side 333 to 500, quality 90): smooth colour fields with
    shapes and grain, about 100 kB each. Returns their total bytes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    total = 0
    for i in range(count):
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = int(rng.integers(400, 640)), int(rng.integers(333, 500))
        yy, xx = np.mgrid[0:height, 0:width]
        base = rng.uniform(0, 255, 3) + 60 * np.sin(xx[..., None] / rng.uniform(20, 80))
        base = base + 40 * np.cos(yy[..., None] / rng.uniform(20, 80) + rng.uniform(0, 6, 3))
        pixels = np.clip(base + rng.normal(0, 14, (height, width, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.integers(0, width), rng.integers(0, height)
            r = int(rng.integers(10, 80))
            draw.ellipse(
                [x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3))
            )
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buffer.getvalue())
        total += len(buffer.getvalue())
    return total


def read_plainly(root: Path) -> float:
    """Seconds to read every file's bytes, one after another."""
    start = time.perf_counter()
    for path in sorted(root.rglob("*.jpg")):
        path.read_bytes()
    return time.perf_counter() - start


def decode_plainly(root: Path) -> float:
    """Seconds to open and decode every image with PIL, one after another."""
    from PIL import Image

    start = time.perf_counter()
    for path in sorted(root.rglob("*.jpg")):
        with Image.open(path) as image:
            image.load()
    return time.perf_counter() - start


def drop_caches() -> bool:
    """Empty the page cache (root only), so files are read from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def prepare_folder(folder: Path, out: Path, workers: int) -> float:
    from workflow_scripts.prepare_data import prepare

    start = time.perf_counter()
    prepare({"source": f"imagefolder:{folder}"}, out, "jpegs", workers)
    return time.perf_counter() - start


def loader_rate(data: Path, workers: int, batches: int, batch_size: int = 64) -> float:
    """Images per second through the training loader (decode, RandomResizedCrop, flip)."""
    from workflow_scripts import loaders
    from workflow_scripts.batches import loader
    from workflow_scripts.models.resnet import imagenet_preprocess

    examples = loaders.ImageExamples(data, imagenet_preprocess(256, 224), seed=0)
    held = loaders.held_out_rows(examples.rows, 0.01, 0, examples.row_group_rows)
    order = loaders.EpochOrder(
        examples.rows,
        held,
        0,
        examples.group_starts,
        loaders.window_groups(batch_size, examples.row_group_rows),
    )
    source = loader(
        loaders.StepBatches(examples, order, batch_size, 0, batches + 2), workers, False
    )
    iterator = iter(source)
    for _ in range(2):  # workers started and a batch each made
        next(iterator)
    start = time.perf_counter()
    seen = sum(len(next(iterator)["labels"]) for _ in range(batches))
    return seen / (time.perf_counter() - start)


def train_wait(work: Path, data: Path, threads: int) -> tuple[float, float]:
    """(share of the run spent waiting for data, images per second) of a ResNet-18-shaped
    ImageNet-style model training on the JPEGs, from the train job's log."""
    run = {
        **TRAIN_COMMON,
        "kind": "image_classification",
        "num_labels": 10,
        "arch": {
            "block": "basic",
            "layers": [2, 2, 2, 2],
            "widths": [64, 128, 256, 512],
            "stem": "imagenet",
            "norm": "rms",
        },
        "batch_size": 16,
        "steps": 12,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    }
    log = work / "train-jpeg.log"
    _, seconds = peak_rss(
        stage(
            "train",
            threads,
            model="jpeg",
            spec=json.dumps(run),
            data=data,
            base="",
            tokenizer="",
            checkpoint=work / "jpeg.pt",
            metrics=work / "jpeg.parquet",
            plot=work / "jpeg.png",
            out=work / "model-jpeg",
        ),
        log,
    )
    text = log.read_text()
    found = re.search(r"waited for data ([\d.]+)% of the time \(([\d.]+) s of ([\d.]+) s", text)
    if not found:
        raise RuntimeError(f"no wait figure in {log}")
    return float(found.group(1)) / 100, 12 * 16 / float(found.group(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="N (the built-in sets)")
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the image folder")
    parser.add_argument("--workdir", type=Path, help="keep the files here")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="data-streaming-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"cores: {os.cpu_count()}, work: {work}", file=sys.stderr)

    small, large = stages(work / "n", args.rows), stages(work / "10n", 10 * args.rows)
    print(f"{'stage':<16}{'N MB':>9}{'10N MB':>9}{'ratio':>7}")
    ratios = {}
    for stage in small:
        ratios[stage] = large[stage] / small[stage]
        print(f"{stage:<16}{small[stage]:>9.0f}{large[stage]:>9.0f}{ratios[stage]:>7.2f}")

    folder = work / "jpegs"
    file_bytes = make_jpegs(folder, args.images)
    out = work / "jpegs.parquet"
    cold = drop_caches()
    timings: dict[str, list[float]] = {
        k: [] for k in ("read", "decode", "ours", "warm_read", "warm_ours")
    }
    for _ in range(3):  # alternated: the machine is noisy
        if cold:  # from the disk, as at the study's scale (140 GB is not in any page cache)
            drop_caches()
            timings["read"].append(read_plainly(folder))
            drop_caches()
            timings["ours"].append(prepare_folder(folder, out, 2))
        read_plainly(folder)
        timings["warm_read"].append(read_plainly(folder))
        timings["decode"].append(decode_plainly(folder))
        timings["warm_ours"].append(prepare_folder(folder, out, 2))
    best = {k: min(v) if v else float("nan") for k, v in timings.items()}
    stored = out.stat().st_size
    print(
        f"image folder of {args.images} JPEGs ({file_bytes / 1e6:.0f} MB), prepare_data with 2 "
        f"workers: from the disk {best['ours']:.2f} s against a plain read of "
        f"{best['read']:.2f} s; from the page cache {best['warm_ours']:.2f} s against "
        f"{best['warm_read']:.2f} s to read and {best['decode']:.2f} s to decode with PIL in one "
        f"process; stored {stored / 1e6:.0f} MB"
    )
    one = loader_rate(work / "jpegs.parquet", 1, 12)
    two = loader_rate(work / "jpegs.parquet", 2, 12)
    print(f"training loader: {one:.0f} images/s with 1 worker, {two:.0f} with 2")
    wait, rate = train_wait(work, work / "jpegs.parquet", threads=2)
    print(
        f"ResNet-18 shape on the CPU, 1 loader worker: {rate:.1f} images/s, "
        f"{100 * wait:.1f}% of the time waiting for data"
    )
    print(
        json.dumps(
            {
                "peak_rss_10n_over_n": {k: round(v, 3) for k, v in ratios.items()},
                "worst_rss_10n_over_n": round(max(ratios.values()), 3),
                "loader_2_workers_over_1": round(two / one, 3),
                "train_wait_fraction": round(wait, 4),
                "prepare_over_plain_read_from_disk": round(best["read"] / best["ours"], 3),
                "prepare_over_plain_read_cached": round(best["warm_read"] / best["warm_ours"], 3),
                "prepare_over_plain_decode_cached": round(best["decode"] / best["warm_ours"], 3),
                "stored_over_file_bytes": round(stored / file_bytes, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
