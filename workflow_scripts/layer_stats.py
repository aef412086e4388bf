"""layer_stats: the statistics of one read-out point over every shard of a model and dataset.

Reads ``layer-{k}`` of each shard in blocks of rows (one pass, memory bounded by the block),
drops padding rows unless asked not to, and writes one Parquet file in long form. The arithmetic
runs on ``stats.device`` (a GPU where there is one, with ``auto``), giving the CPU's numbers:
float32 moments and rotations (no TF32), float64 sums on the host. The rotations are dense
Haar-random or structured (``stats.rotation``).
"""

from __future__ import annotations

import functools
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from workflow_scripts.activations import layer_name, open_shard, stored_dtype
from workflow_scripts.atomic import write_parquet
from workflow_scripts.batches import pick_device
from workflow_scripts.options.stats import StatsOptions
from workflow_scripts.rotations import make_rotation
from workflow_scripts.shard_reader import file_rows, read_rows
from workflow_scripts.streaming_stats import LayerStatistics, StatisticsError

log = logging.getLogger("layer_stats")
BLOCK_BYTES = 64 << 20  # float32 bytes of one block of rows


def _layer_arrays(shards: list[str | Path], layer: int):
    """The shards' arrays of ``layer`` and its read-out record, after checking they agree."""
    arrays, dtypes, readout = [], [], None
    for path in shards:
        group = open_shard(path)
        readouts = group.attrs["readouts"]
        if layer >= len(readouts):
            raise StatisticsError(f"{path}: has {len(readouts)} read-out points, no layer {layer}")
        array = group[layer_name(layer)]
        dtype = stored_dtype(array)  # float16, bfloat16 or float32, read as float values
        if readout is not None and (readouts[layer] != readout or dtype != dtypes[0]):
            raise StatisticsError(
                f"shards disagree on layer {layer}: {shards[0]} has {readout} as "
                f"{dtypes[0]}, {path} has {readouts[layer]} as {dtype}"
            )
        readout = readouts[layer]
        arrays.append((array, group, path))
        dtypes.append(dtype)
    return arrays, readout


def _read_block(group, path, layer: int, start: int, stop: int, include_padding: bool):
    """Rows ``start:stop`` of one shard: (activations, example ids), padding dropped unless
    ``include_padding``."""
    x = read_rows(group, layer_name(layer), start, stop, path)
    ids = read_rows(group, "example_id", start, stop, path)
    if include_padding:
        return x, ids
    keep = ~read_rows(group, "is_padding", start, stop, path)
    return x[keep], ids[keep]


def _blocks(arrays, layer: int, width: int, include_padding: bool):
    """Functions that each read one block of rows: (activations, example ids), in order."""
    for array, group, path in arrays:
        unit = file_rows(array)
        size = max(unit, BLOCK_BYTES // (4 * width) // unit * unit)
        for start in range(0, array.shape[0], size):
            stop = min(start + size, array.shape[0])
            yield functools.partial(_read_block, group, path, layer, start, stop, include_padding)


def _prefetched(readers):
    """The results of ``readers`` in order, each read in a thread while the previous one is
    being used, so decoding overlaps computing."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for read in readers:
            upcoming = pool.submit(read)
            if pending is not None:
                yield pending.result()
            pending = upcoming
        if pending is not None:
            yield pending.result()


def compute(
    shards: list[str | Path], layer: int, thresholds: list[float], options: StatsOptions
) -> pd.DataFrame:
    """Long-form statistics of read-out point ``layer`` over ``shards`` (in example order)."""
    if not shards:
        raise StatisticsError("no shards given")
    arrays, readout = _layer_arrays(shards, layer)
    width = readout["width"]
    rotations = [
        make_rotation(options.rotation, width, options.seed, layer, r)
        for r in range(options.rotations)
    ]
    device = pick_device(options.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # rotations in full float32, as on the CPU
    stats = LayerStatistics(
        width,
        rotations,
        device,
        average=options.average,
        rms=options.rms,
    )
    total = sum(a.shape[0] for a, _, _ in arrays)
    with tqdm(
        total=total, desc=f"layer {layer}", unit="row", file=sys.stderr, mininterval=5
    ) as progress:
        for x, ids in _prefetched(_blocks(arrays, layer, width, options.include_padding)):
            stats.update(x, ids)
            progress.update(len(ids))
    try:
        records = stats.results(thresholds, options.top_features)
    except StatisticsError as error:
        hint = (
            "" if options.include_padding else " (padding rows excluded; see stats.include_padding)"
        )
        raise StatisticsError(f"layer {layer}: {error}{hint}") from None
    frame = pd.DataFrame(records)
    frame.insert(0, "layer", layer)
    for i, key in enumerate(("stage", "block", "name"), start=1):
        frame.insert(i, key, readout[key])
    frame["feature"] = frame["feature"].astype("Int64")
    return frame


def run(
    shards: list[str],
    layer: int,
    thresholds: list[float],
    options: StatsOptions,
    model: str,
    dataset: str,
    out: str,
) -> None:
    """The layer_stats stage: the statistics of read-out point ``layer`` over every shard,
    each record naming the model and the dataset."""
    frame = compute(shards, layer, thresholds, options)
    frame.insert(0, "dataset", dataset)
    frame.insert(0, "model", model)
    write_parquet(frame, out)
    log.info("wrote %s: %d records", out, len(frame))
