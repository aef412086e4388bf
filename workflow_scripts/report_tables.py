"""tables: the statistics and ablation results of every model and dataset as one CSV each, for
the HTML report (which shows CSV files as tables)."""

from __future__ import annotations

import pandas as pd

from workflow_scripts.atomic import written


def write_csv(paths: list[str], out: str, seeds: dict | None = None) -> None:
    """The Parquet files ``paths`` as one CSV; with ``seeds`` ({trained model: its run's
    seed}), a ``seed`` column after ``model`` (empty for models not trained here)."""
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    if seeds is not None:
        frame.insert(
            list(frame.columns).index("model") + 1,
            "seed",
            frame["model"].map(seeds).astype("Int64"),
        )
    with written(out) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


def run(data: list[str], out: str, seeds: dict | None = None) -> None:
    """The table stages: the Parquet files ``data`` as one CSV table for the report, the
    statistics' with each trained model's seed."""
    write_csv(data, out, seeds)
