"""merge_stats: the per-layer statistics of a model and dataset in one Parquet file."""

from __future__ import annotations

import sys

import pandas as pd

from workflow_scripts.atomic import write_parquet


def merge(paths: list[str]) -> pd.DataFrame:
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    layers = frame["layer"].unique()
    if sorted(layers) != list(range(len(paths))):
        raise ValueError(f"expected layers 0..{len(paths) - 1}, got {sorted(layers)}")
    return frame.sort_values("layer", kind="stable").reset_index(drop=True)


def run(layers: list[str], out: str) -> None:
    """The merge_stats stage: the layers' statistics in one file."""
    frame = merge(layers)
    write_parquet(frame, out)
    print(f"wrote {out}: {len(frame)} records", file=sys.stderr)
