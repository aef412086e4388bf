"""layer_stats: the statistics of one read-out point over every shard of a model and dataset.

Reads ``layer-{k}`` of the shards through :mod:`workflow_scripts.stream` in blocks of rows (one
pass, memory bounded by the block, the next block read in a thread while this one is computed),
drops padding rows unless asked not to, and writes one Parquet file in long form. The arithmetic
runs on ``stats.device`` (a GPU where there is one, with ``auto``), giving the CPU's numbers:
float32 moments and rotations (no TF32), float64 sums on the host. The rotations are dense
Haar-random or structured (``stats.rotation``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from workflow_scripts.atomic import write_parquet
from workflow_scripts.batches import pick_device
from workflow_scripts.options.stats import StatsOptions
from workflow_scripts.rotations import make_rotation
from workflow_scripts.stream import ActivationSet, StreamError
from workflow_scripts.streaming_stats import LayerStatistics, StatisticsError

log = logging.getLogger("layer_stats")


def compute(
    shards: list[str | Path],
    layer: int,
    thresholds: list[float],
    options: StatsOptions,
    basis_seed: int | None = None,
) -> pd.DataFrame:
    """Long-form statistics of read-out point ``layer`` over ``shards`` (in example order); with
    ``basis_seed`` (a model trained with its optimizer in a rotated basis), also the kurtosis of
    the stream in the optimizer's basis (``optimizer_basis_kurtosis``: of x @ Q,
    ``optimizers.optimizer_basis(basis_seed, width)``)."""
    if not shards:
        raise StatisticsError("no shards given")
    try:  # the shards, checked to agree on this read-out point and what shaped them
        acts = ActivationSet.from_shards(shards, readouts=[layer])
    except StreamError as error:
        raise StatisticsError(str(error)) from None
    readout = acts.readout(layer)
    width = readout.width
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
    in_basis = None  # the stream in the optimizer's coordinates, where it had its own
    if basis_seed is not None:
        from workflow_scripts.optimizers import optimizer_basis

        basis = optimizer_basis(basis_seed, width).float().to(device)
        in_basis = LayerStatistics(  # its kurtosis alone is kept
            width, rotations[:1], device, average=options.average, rms=options.rms
        )
    blocks = acts.blocks(layer, include_padding=options.include_padding, index=("example_id",))
    with tqdm(
        total=acts.rows, desc=f"layer {layer}", unit="row", file=sys.stderr, mininterval=5
    ) as progress:
        for x, ids in blocks:  # whole shard files, about 64 MB as float32, read ahead
            stats.update(x, ids)
            if in_basis is not None:
                rotated = torch.as_tensor(x).to(device, torch.float32) @ basis
                in_basis.update(rotated.cpu().numpy(), ids)
            progress.update(len(ids))
    try:
        records = stats.results(thresholds, options.top_features)
    except StatisticsError as error:
        hint = (
            "" if options.include_padding else " (padding rows excluded; see stats.include_padding)"
        )
        raise StatisticsError(f"layer {layer}: {error}{hint}") from None
    if in_basis is not None:
        records += [
            {
                **r,
                "metric": "optimizer_basis_kurtosis",
                "setting": f"the optimizer's basis, seed {basis_seed}",
            }
            for r in in_basis.results(thresholds, 0)
            if r["metric"] == "kurtosis"
        ]
    frame = pd.DataFrame(records)
    frame.insert(0, "layer", layer)
    for i, key in enumerate(("stage", "block", "name"), start=1):
        frame.insert(i, key, getattr(readout, key))
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
    basis_seed: int | None = None,
) -> None:
    """The layer_stats stage: the statistics of read-out point ``layer`` over every shard,
    each record naming the model and the dataset (and, of a model whose optimizer worked in a
    rotated basis of seed ``basis_seed``, its kurtosis in that basis)."""
    frame = compute(shards, layer, thresholds, options, basis_seed)
    frame.insert(0, "dataset", dataset)
    frame.insert(0, "model", model)
    write_parquet(frame, out)
    log.info("wrote %s: %d records", out, len(frame))
