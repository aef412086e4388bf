"""What each storage dtype of the stream (``extract.dtype``) costs the statistics, against float32.

Synthetic layers shaped like a transformer's residual stream, ``--rows`` rows x ``--width``
features, 128 rows (token positions) per example, seeded:

  * every feature Student-t with 3 degrees of freedom (heavy tails; kurtosis across a row of a
    few to tens), times a per-row scale drawn log-normal (sigma 0.5) so rows differ in norm;
  * 4 outlier features (dims 7, 100, 300, 555) scaled 20x, 30x, 40x, 60x: the privileged basis
    that outlier counts and rotated kurtosis measure (they cross thresholds 4, 6, 10);
  * massive activations: in the first row of every example (a BOS token) 2 dims (138, 447) set
    to +-M (times 1 + 0.1 N(0, 1), per example), as in GPT-2 and Llama-2-7B (M = 2.5e3, layer
    ``gpt2-like``) and in Gemma-3-27B (M = 7e5, past float16's range, layer ``gemma-like``);
    10% of the other rows carry the same dims at M/20 (same spread).

Each layer is stored with ``ShardWriter`` (uncompressed, the extraction's default chunking) as
float16, bfloat16 and float32 from the same float32 rows (the writer casts; extraction casts on
the device instead), then read back with the stages' reader (``shard_reader.read_rows``:
bfloat16 decoded to float32) and given to ``layer_stats.compute``, the project's statistics: a
dense Haar rotation, averages over examples, the study's RMS, padding counted. Reported per
storage dtype against float32 storage: the largest absolute and relative differences of
kurtosis, rotated kurtosis, RMS and max_over_median, and of the outlier fraction and count
(signed and |x|, thresholds 4, 6, 10); the stored bytes, and the time to write (cast + write),
to read (every row, decoded) and to compute the statistics, as ratios to float32's, fastest of
``--repeats`` (the dtypes interleaved within each repeat, after one untimed warm-up run of the
statistics, so machine noise hits all alike). Times are the process's CPU time (all its threads:
the writer's, the reader's, torch's), which other work on a shared machine disturbs less than
wall time does. A dtype that cannot hold the layer is reported as
refused (extraction stops there; nothing is stored). The write here casts on the host (numpy
for float16, torch for bfloat16); extraction casts on the device, so only the bytes written
matter to it. The read of float16 returns float16 (the statistics widen it on their device);
bfloat16's includes its decoding to float32.

    .venv/bin/python benchmarks/storage_dtype.py              # about 1.5 min on 2 cores
    .venv/bin/python benchmarks/storage_dtype.py --rows 8192  # quicker

The last line is JSON: per layer and dtype, the differences and ratios above.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflow_scripts.activations import (  # noqa: E402
    ShardWriter,
    StreamOverflowError,
    layer_name,
    open_shard,
)
from workflow_scripts.layer_stats import compute  # noqa: E402
from workflow_scripts.models.adapter import Readout  # noqa: E402
from workflow_scripts.options.stats import StatsOptions  # noqa: E402
from workflow_scripts.shard_reader import file_rows, read_rows  # noqa: E402

OPTIONS = StatsOptions(
    include_padding=True,
    rotation="haar",
    rotations=1,
    seed=0,
    top_features=5,
    average="examples",
    rms="root_mean_square",
    device="cpu",
)
THRESHOLDS = [4.0, 6.0, 10.0]
TOKENS = 128  # rows per example
DTYPES = ("float32", "float16", "bfloat16")  # float32 first: the reference
OUTLIERS = {7: 20.0, 100: 30.0, 300: 40.0, 555: 60.0}
MASSIVE_DIMS = (138, 447)
LAYERS = {"gpt2-like": 2.5e3, "gemma-like": 7e5}  # the massive activations' magnitude
METRICS = ("kurtosis", "rotated_kurtosis", "rms", "max_over_median", "outlier_fraction")


def synthetic_layer(rows: int, width: int, massive: float, seed: int = 0) -> np.ndarray:
    """[rows, width] float32 rows as the module docstring describes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, (rows, width)).astype(np.float32)
    x *= rng.lognormal(0.0, 0.5, (rows, 1)).astype(np.float32)
    for dim, scale in OUTLIERS.items():
        if dim < width:
            x[:, dim] *= scale
    dims = [d % width for d in MASSIVE_DIMS]
    first = np.arange(0, rows, TOKENS)
    spread = 1 + 0.1 * rng.standard_normal((len(first), 1))
    x[np.ix_(first, dims)] = massive * spread * np.array([1.0, -1.0])
    some = np.flatnonzero(rng.random(rows) < 0.1)
    spread = 1 + 0.1 * rng.standard_normal((len(some), 1))
    x[np.ix_(some, dims)] = massive / 20 * spread * np.sign(x[np.ix_(some, dims)])
    return x


def store(path: Path, x: np.ndarray, dtype: str) -> float:
    """Write ``x`` as one read-out point in ``dtype``; the CPU seconds it took (cast included)."""
    rows, width = x.shape
    readout = Readout(0, 0, 0, "block", width)
    start = time.process_time()
    writer = ShardWriter(path, [readout], rows, dtype, 1024, 8)
    try:
        for first in range(0, rows, 8192):  # batches as extraction hands them over
            part = slice(first, min(rows, first + 8192))
            n = part.stop - part.start
            ids = np.arange(part.start, part.stop) // TOKENS
            positions = (np.arange(part.start, part.stop) % TOKENS).astype(np.int32)
            writer.append([x[part]], ids, positions, np.zeros(n, bool))
        writer.close({"readouts": [readout.as_dict()], "dtype": dtype})
    except BaseException:
        writer.abort()
        raise
    return time.process_time() - start


def read_all(path: Path) -> float:
    """Read every row as the statistics do (a shard file at a time, decoded); CPU seconds."""
    start = time.process_time()
    group = open_shard(path)
    name = layer_name(0)
    array = group[name]
    step = file_rows(array)
    for first in range(0, array.shape[0], step):
        rows = read_rows(group, name, first, first + step, path)
        assert rows.dtype != np.uint16
    return time.process_time() - start


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def statistics(path: Path) -> tuple[dict, float]:
    """{(metric, setting): value} of layer_stats on ``path``, and the CPU seconds it took."""
    start = time.process_time()
    frame = compute([path], 0, THRESHOLDS, OPTIONS)
    seconds = time.process_time() - start
    frame = frame[frame["metric"].isin(METRICS)]
    return {
        (m, s): float(v) for m, s, v in zip(frame["metric"], frame["setting"], frame["value"])
    }, seconds


def differences(values: dict, reference: dict, width: int) -> dict:
    """Per metric, the largest |difference| and |difference| / |reference| over its settings
    (and for the outlier fraction, the largest difference of the count of features)."""
    out = {}
    for metric in METRICS:
        keys = [k for k in reference if k[0] == metric]
        diff = [abs(values[k] - reference[k]) for k in keys]
        rel = [d / abs(reference[k]) for d, k in zip(diff, keys) if reference[k] != 0]
        out[metric] = {"abs": max(diff), "rel": max(rel, default=0.0)}
        if metric == "outlier_fraction":
            out[metric]["count"] = round(max(diff) * width)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32_768)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    report, warm = {}, False
    with tempfile.TemporaryDirectory() as tmp:
        for layer, massive in LAYERS.items():
            x = synthetic_layer(args.rows, args.width, massive)
            print(
                f"\nlayer {layer}: {args.rows} rows x {args.width}, {TOKENS} rows per example, "
                f"massive activations {massive:g}, largest |x| {np.abs(x).max():.4g}"
            )
            results = {d: {"write_s": [], "read_s": [], "stats_s": []} for d in DTYPES}
            for repeat in range(args.repeats):
                for dtype in DTYPES:
                    result, path = results[dtype], Path(tmp) / f"{layer}-{dtype}.zarr"
                    if "refused" in result:
                        continue
                    shutil.rmtree(path, ignore_errors=True)
                    try:
                        result["write_s"].append(store(path, x, dtype))
                    except StreamOverflowError as error:
                        results[dtype] = {"refused": str(error)}
                        continue
                    result["read_s"].append(read_all(path))
                    if repeat == 0 and not warm:  # torch, its threads, the rotation's first use
                        statistics(path)
                        warm = True
                    result["values"], seconds = statistics(path)
                    result["stats_s"].append(seconds)
                    result["bytes"] = disk_bytes(path)
            for result in results.values():
                for key in ("write_s", "read_s", "stats_s"):
                    if key in result:
                        result[key] = min(result[key])
            reference = results["float32"]
            print(
                f"{'':9} {'kurtosis':>19} {'rotated kurtosis':>19} {'rms':>19} "
                f"{'max/median':>19} {'outliers':>14} {'bytes':>6} {'write':>6} {'read':>6} "
                f"{'stats':>6}"
            )
            print(
                f"{'':9} {'abs':>9} {'rel':>9} {'abs':>9} {'rel':>9} {'abs':>9} {'rel':>9} "
                f"{'abs':>9} {'rel':>9} {'fraction':>9} {'n':>4} {'ratio to float32':>27}"
            )
            report[layer] = {}
            for dtype in DTYPES:
                result = results[dtype]
                if "refused" in result:
                    print(f"{dtype:9} refused: {result['refused'][:110]}...")
                    report[layer][dtype] = "refused"
                    continue
                diff = differences(result["values"], reference["values"], args.width)
                ratios = {
                    key: result[key] / reference[key]
                    for key in ("bytes", "write_s", "read_s", "stats_s")
                }
                cells = " ".join(
                    f"{diff[m]['abs']:9.2e} {diff[m]['rel']:9.2e}"
                    for m in ("kurtosis", "rotated_kurtosis", "rms", "max_over_median")
                )
                outliers = diff["outlier_fraction"]
                print(
                    f"{dtype:9} {cells} {outliers['abs']:9.2e} {outliers['count']:4d} "
                    + " ".join(
                        f"{ratios[k]:6.2f}" for k in ("bytes", "write_s", "read_s", "stats_s")
                    )
                )
                report[layer][dtype] = {**diff, **{f"{k}_ratio": v for k, v in ratios.items()}}
            f32 = reference
            print(
                f"float32 itself: {f32['bytes'] / 2**20:.0f} MiB, CPU seconds: write "
                f"{f32['write_s']:.2f}, read {f32['read_s']:.2f}, statistics {f32['stats_s']:.2f}; "
                "kurtosis "
                f"{f32['values'][next(k for k in f32['values'] if k[0] == 'kurtosis')]:.4g}"
            )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
