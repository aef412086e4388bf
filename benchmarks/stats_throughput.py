"""Time and memory of layer_stats on one float16 layer, against a floor and the study's approach.

Measured side by side in one run, on a synthetic layer (Gaussian with a few outlier features,
128 rows per example, written with the extraction's default chunking):

  ours       workflow_scripts.layer_stats.compute: every statistic, one pass, one fixed dense
             (Haar) rotation;
  ours_fast  the same with stats.rotation: structured (random signs, Hadamard and small Haar
             factors and a permutation instead of the dense matrix product);
  floor      reading the same array as layer_stats reads it and decoding it to float32, plus one
             matrix product of each block by the rotation (nothing less can give a dense rotated
             kurtosis);
  floor_no_rotation  reading and decoding only;
  study  the study's own algorithm (its src/metrics: outliers, kurtosis, rotated-kurtosis, rms):
         one rotation for the layer drawn once (torch QR of a Gaussian matrix), batches of 128
         examples in float32, scipy.stats.kurtosis in float32 per token then averaged, the
         rotation applied with a torch matmul, its RMS and its signed outliers.

Then peak RSS of `compute` in a fresh process with N and 10 N rows.

    .venv/bin/python benchmarks/stats_throughput.py                # 196k x 768, about 3 minutes
    .venv/bin/python benchmarks/stats_throughput.py --rows 32768   # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.stats
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflow_scripts.activations import ShardWriter, open_shard  # noqa: E402
from workflow_scripts.layer_stats import compute  # noqa: E402
from workflow_scripts.models.adapter import Readout  # noqa: E402
from workflow_scripts.options.stats import StatsOptions  # noqa: E402
from workflow_scripts.rotations import random_rotation  # noqa: E402
from workflow_scripts.shard_reader import read_rows  # noqa: E402

OPTIONS = {
    "include_padding": True,
    "rotation": "haar",
    "rotations": 1,
    "seed": 0,
    "top_features": 5,
    "average": "examples",
    "rms": "root_mean_square",
    "device": "cpu",
}
TOKENS = 128  # rows per example


def write_layer(path: Path, rows: int, width: int) -> Path:
    rng = np.random.default_rng(0)
    writer = ShardWriter(path, [Readout(0, 0, 0, "block", width)], rows, "float16", 1024, 8)
    for start in range(0, rows, 8192):
        n = min(8192, rows - start)
        x = rng.standard_normal((n, width), dtype=np.float32)
        x[:, [7, 300]] *= 40
        ids = (start + np.arange(n)) // TOKENS
        writer.append(
            [x.astype(np.float16)], ids, (start + np.arange(n)) % TOKENS, np.zeros(n, bool)
        )
    writer.close({"readouts": [Readout(0, 0, 0, "block", width).as_dict()]})
    return path


def floor(path: Path, width: int, rotate: bool = True) -> None:
    """Read every row as layer_stats does (a shard file at a time, straight from the files),
    decode it to float32 with torch, and with ``rotate`` multiply it by a dense rotation."""
    group = open_shard(path)
    array = group["layer-0"]
    q = torch.from_numpy(random_rotation(width, 0, 0, 0))
    for start in range(0, array.shape[0], array.shards[0]):
        x = torch.from_numpy(read_rows(group, "layer-0", start, start + array.shards[0], path))
        x = x.float()
        (x @ q if rotate else x).sum()


def study(path: Path, width: int, examples: int = 128) -> None:
    import zarr

    array = zarr.open_group(path, mode="r")["layer-0"]
    rotation = torch.linalg.qr(torch.randn(width, width))[0]  # one per layer, once
    batch = examples * TOKENS
    outliers = np.zeros(width, bool)
    kurtosis = rotated = mean_square = 0.0
    for start in range(0, array.shape[0], batch):
        x = torch.from_numpy(array[start : start + batch]).float().view(-1, TOKENS, width)
        outliers |= (x > 10.0).numpy().any(axis=(0, 1))
        kurtosis += scipy.stats.kurtosis(x.numpy(), axis=-1, fisher=False).mean(axis=-1).sum()
        mean_square += (x**2).numpy().mean(axis=(-1, -2)).sum()
        x = x @ rotation
        rotated += scipy.stats.kurtosis(x.numpy(), axis=-1, fisher=False).mean(axis=-1).sum()


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


RSS_PROBE = """
import re, sys
sys.path.insert(0, {root!r})
from workflow_scripts.layer_stats import compute
from workflow_scripts.options.stats import StatsOptions
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
rss = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
compute([{path!r}], 0, [10.0], StatsOptions(**{options!r}))
print(rss, status("VmHWM"))
"""


def peak_rss_mb(path: Path) -> tuple[float, float]:
    """RSS of a fresh process after its imports, and its peak RSS while it ran compute."""
    code = RSS_PROBE.format(
        root=str(Path(__file__).resolve().parents[1]), path=str(path), options=OPTIONS
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, peak = (int(v) / 1024 for v in out.stdout.split()[-2:])
    return before, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=196_608)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--study-examples", type=int, default=128, help="examples per batch of the study's"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_layer(Path(tmp) / "layer.zarr", args.rows, args.width)
        print(f"layer: {args.rows} rows x {args.width} float16, {TOKENS} rows per example")
        typed = StatsOptions(**OPTIONS)
        fast = replace(typed, rotation="structured")
        ours, ours_fast, low, lowest, theirs = [], [], [], [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
            lowest.append(timed(floor, path, args.width, False))
            low.append(timed(floor, path, args.width))
            ours.append(timed(compute, [path], 0, [10.0], typed))
            ours_fast.append(timed(compute, [path], 0, [10.0], fast))
            theirs.append(timed(study, path, args.width, args.study_examples))
        o, of, f, f0, s = (min(t) for t in (ours, ours_fast, low, lowest, theirs))
        print(f"floor_no_rotation (read + decode):     {f0:7.2f} s")
        print(f"floor (read + decode + one rotation):  {f:7.2f} s")
        print(f"layer_stats (every statistic, haar):   {o:7.2f} s   {o / f:.2f}x the floor")
        print(
            f"layer_stats (every statistic, structured): {of:7.2f} s   "
            f"{of / f0:.2f}x floor_no_rotation"
        )
        print(
            f"study's algorithm (batches of {args.study_examples} examples): {s:7.2f} s   "
            f"layer_stats is {s / o:.2f}x faster (haar), {s / of:.2f}x (structured)"
        )
        small = write_layer(Path(tmp) / "small.zarr", args.rows // 10, args.width)
        (base, rss_small), (_, rss_large) = peak_rss_mb(small), peak_rss_mb(path)
        print(
            f"peak RSS: {rss_small:.0f} MB at {args.rows // 10} rows, {rss_large:.0f} MB at "
            f"{args.rows} rows: {rss_large / rss_small:.2f}x for 10x the rows "
            f"({base:.0f} MB after imports, so {rss_small - base:.0f} MB and "
            f"{rss_large - base:.0f} MB of work)"
        )
        print(
            json.dumps(
                {
                    "floor_s": f,
                    "floor_no_rotation_s": f0,
                    "ours_s": o,
                    "ours_fast_s": of,
                    "study_s": s,
                    "ours_over_floor": o / f,
                    "study_over_ours": s / o,
                    "study_over_ours_fast": s / of,
                    "ours_fast_over_floor_no_rotation": of / f0,
                    "rss_ratio": rss_large / rss_small,
                }
            )
        )


if __name__ == "__main__":
    main()
