"""Reading a stored read-out point through workflow_scripts.stream, against reading its files
plainly, and training batches through RowDataset, shuffled against in order.

On a synthetic activation set (one float16 read-out point of ``--width`` features, ``--gb``
gigabytes over ``--shards`` shards, 128 rows per example with the last 10% of each example
padding, written with the extraction's default chunking: 1024-row chunks, 8 a file):

  plain        every shard file of the read-out point read whole with numpy (``np.fromfile``):
               the bytes and nothing else, no checksum, no layout;
  plain_checked  the same and google_crc32c over every byte read: the least any reader that
               verifies the stored checksums does (on this project's 2-core machine a crc32c
               pass costs about as much CPU as the copy, so it bounds a checked read near half
               of plain where the cores are busy);
  sequential   the read-out point read through the reader's lazy view, ``acts[0][a:b]``, a
               shard file's rows a slice, as plain reads a file at a time (every chunk's
               crc32c verified, the chunks placed in order); and in 64 MB slices, where each
               slice is fresh memory from the kernel (plain's file-sized arrays reuse the
               memory the last one freed, which saves the page faults);
  blocks       the stages' path, ``acts.blocks(0)`` (also the example ids, a thread ahead);
  dataset_in_order  RowDataset(shuffle=False): batches of 4096 rows as float32 tensors,
               padding dropped, in the main process;
  dataset_shuffled  RowDataset(shuffle=True), the same, in the main process, and through a
               DataLoader with 1 and 2 workers.

Every timing is the best of ``--repeats`` rounds, each round running every path once (so the
machine's load hits all alike), after one plain pass has put the files in the page cache (so
all of them read from memory: what is measured is the reader's own cost). Then the
peak RSS of a fresh process reading half the shards and all of them (sequential, and shuffled
batches), whose ratio says whether memory grows with the rows.

    .venv/bin/python benchmarks/stream_read.py            # 1 GB, about 2 minutes on 2 cores
    .venv/bin/python benchmarks/stream_read.py --gb 0.25  # quicker

The last line is one JSON object: ``sequential_over_plain`` (goal >= 0.8),
``shuffled_over_sequential`` (shuffled dataset batches against in-order ones, goal >= 0.5),
rows/s of each path, and ``rss_ratio`` (peak RSS at twice the rows over once, goal near 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import google_crc32c
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflow_scripts.activations import ShardWriter  # noqa: E402
from workflow_scripts.models.adapter import Readout  # noqa: E402
from workflow_scripts.stream import ActivationSet, RowDataset, open_activations  # noqa: E402

TOKENS = 128  # rows per example
BATCH = 4096
FILE_ROWS = 8192  # rows of a shard file (1024-row chunks, 8 a file)


def write_set(folder: Path, rows: int, width: int, shards: int) -> None:
    """A float16 read-out point of ``rows`` rows in ``shards`` shards, as extraction lays it
    out (the default chunking), its example ids, positions and padding flags."""
    rng = np.random.default_rng(0)
    readout = Readout(0, 0, 0, "block.0", width)
    examples = rows // TOKENS
    bounds = np.linspace(0, examples, shards + 1).astype(int)
    for s in range(shards):
        first, last = bounds[s] * TOKENS, bounds[s + 1] * TOKENS
        path = folder / f"shard-{s}.zarr"
        writer = ShardWriter(path, [readout], last - first, "float16", 1024, 8)
        for start in range(first, last, 8192):
            n = min(8192, last - start)
            row = start + np.arange(n)
            x = rng.standard_normal((n, width), dtype=np.float32).astype(np.float16)
            position = (row % TOKENS).astype(np.int32)
            writer.append([x], row // TOKENS, position, position >= TOKENS * 0.9)
        writer.close(
            {
                "readouts": [readout.as_dict()],
                "shard": s,
                "shards": shards,
                "example_range": [int(bounds[s]), int(bounds[s + 1])],
                "modality": "text",
            }
        )


def best(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def plain(folder: Path) -> int:
    """Every file of read-out point 0, read whole with numpy: the bytes read."""
    total = 0
    for file in sorted(folder.glob("shard-*.zarr/layer-0/c/*/0")):
        total += np.fromfile(file, np.uint8).nbytes
    return total


def plain_checked(folder: Path) -> int:
    """The same, and the crc32c of every byte: what any reader that verifies the checksums
    must do at least."""
    total = 0
    for file in sorted(folder.glob("shard-*.zarr/layer-0/c/*/0")):
        data = np.fromfile(file, np.uint8)
        google_crc32c.value(data)
        total += data.nbytes
    return total


def sequential(acts: ActivationSet, step: int = FILE_ROWS) -> int:
    """The read-out point through the lazy view, ``step`` rows a slice."""
    view = acts[0]
    rows = 0
    for start in range(0, len(view), step):
        rows += len(view[start : start + step])
    return rows


def blocks(acts: ActivationSet) -> int:
    return sum(len(x) for x, _ in acts.blocks(0, index=("example_id",)))


def batches(dataset, workers: int) -> int:
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return sum(len(batch["layer-0"]) for batch in loader)


RSS_PROBE = """
import re, sys
sys.path.insert(0, {root!r})
from workflow_scripts.stream import ActivationSet, RowDataset
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
acts = ActivationSet.from_shards({shards!r})
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
if {mode!r} == "sequential":
    for x, ids in acts.blocks(0, index=("example_id",)):
        pass
else:
    for batch in RowDataset(acts, 0, {batch}, seed=0):
        pass
print(status("VmHWM"))
"""


def peak_rss_mb(shards: list[Path], mode: str) -> float:
    code = RSS_PROBE.format(
        root=str(Path(__file__).resolve().parents[1]),
        shards=[str(s) for s in shards],
        mode=mode,
        batch=BATCH,
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def machine() -> str:
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    return f"{os.cpu_count()} CPUs ({model.group(1) if model else 'unknown'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the read-out point")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write the set (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = int(args.gb * 2**30 / (2 * args.width)) // (TOKENS * args.shards) * TOKENS * args.shards
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "results/activations/synthetic/text"
        folder.mkdir(parents=True)
        start = time.perf_counter()
        write_set(folder, rows, args.width, args.shards)
        print(
            f"{machine()}; wrote {rows} rows x {args.width} float16 "
            f"({rows * args.width * 2 / 2**30:.2f} GiB) in {args.shards} shards in "
            f"{time.perf_counter() - start:.1f} s"
        )
        plain(folder)  # into the page cache
        acts = open_activations(folder)
        nbytes = rows * args.width * 2
        in_order = RowDataset(acts, 0, BATCH, shuffle=False)
        shuffled = RowDataset(acts, 0, BATCH, shuffle=True, seed=0)
        kept = in_order.rows
        runs = {
            "plain": lambda: plain(folder),
            "plain_checked": lambda: plain_checked(folder),
            "sequential": lambda: sequential(acts),
            "sequential_64mb": lambda: sequential(acts, (64 << 20) // (2 * args.width)),
            "blocks": lambda: blocks(acts),
            "in_order": lambda: batches(in_order, 0),
            "shuffled": lambda: batches(shuffled, 0),
            "one_worker": lambda: batches(shuffled, 1),
            "two_workers": lambda: batches(shuffled, 2),
        }
        times = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved, so the machine's load hits all alike
            for name, run in runs.items():
                times[name].append(best(run, 1))
        t_plain, t_checked, t_seq, t_seq64, t_blocks, t_order, t_shuffled, t_one, t_two = (
            min(times[name]) for name in runs
        )
        half = acts.shards[: args.shards // 2]
        rss = {
            mode: (peak_rss_mb(half, mode), peak_rss_mb(acts.shards, mode))
            for mode in ("sequential", "shuffled")
        }
        print(f"plain (np.fromfile):      {t_plain:6.2f} s  {nbytes / t_plain / 1e9:5.2f} GB/s")
        print(f"plain + crc32c:           {t_checked:6.2f} s  {nbytes / t_checked / 1e9:5.2f} GB/s")
        print(
            f"sequential (view slices): {t_seq:6.2f} s  {nbytes / t_seq / 1e9:5.2f} GB/s  "
            f"{t_plain / t_seq:.2f}x plain"
        )
        print(
            f"sequential (64 MB slices): {t_seq64:5.2f} s  {nbytes / t_seq64 / 1e9:5.2f} GB/s  "
            f"{t_plain / t_seq64:.2f}x plain"
        )
        print(
            f"blocks (the stages'):     {t_blocks:6.2f} s  {nbytes / t_blocks / 1e9:5.2f} GB/s  "
            f"{t_plain / t_blocks:.2f}x plain"
        )
        print(f"dataset in order, main process:   {kept / t_order:10.0f} rows/s")
        print(
            f"dataset shuffled, main process:   {kept / t_shuffled:10.0f} rows/s  "
            f"{t_order / t_shuffled:.2f}x in order"
        )
        print(f"dataset shuffled, 1 worker:       {kept / t_one:10.0f} rows/s")
        print(f"dataset shuffled, 2 workers:      {kept / t_two:10.0f} rows/s")
        for mode, (small, large) in rss.items():
            print(
                f"peak RSS {mode}: {small:.0f} MB at {rows // 2} rows, {large:.0f} MB at "
                f"{rows} rows: {large / small:.2f}x for 2x the rows"
            )
        print(
            json.dumps(
                {
                    "rows": rows,
                    "width": args.width,
                    "gib": round(nbytes / 2**30, 3),
                    "plain_gb_s": nbytes / t_plain / 1e9,
                    "sequential_gb_s": nbytes / t_seq / 1e9,
                    "sequential_over_plain": t_plain / t_seq,
                    "sequential_over_plain_checked": t_checked / t_seq,
                    "sequential_64mb_over_plain": t_plain / t_seq64,
                    "blocks_over_plain": t_plain / t_blocks,
                    "dataset_in_order_rows_s": kept / t_order,
                    "dataset_shuffled_rows_s": kept / t_shuffled,
                    "shuffled_over_sequential": t_order / t_shuffled,
                    "rows_s_1_worker": kept / t_one,
                    "rows_s_2_workers": kept / t_two,
                    "rss_mb": {mode: list(pair) for mode, pair in rss.items()},
                    "rss_ratio": max(large / small for small, large in rss.values()),
                }
            )
        )


if __name__ == "__main__":
    main()
