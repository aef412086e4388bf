"""tables: the statistics and ablation results of every model and dataset as one CSV each, for
the HTML report (which shows CSV files as tables)."""

from __future__ import annotations

import pandas as pd

from workflow_scripts.atomic import written


def write_csv(paths: list[str], out: str) -> None:
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    with written(out) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


def run(data: list[str], out: str) -> None:
    """The table stages: the Parquet files ``data`` as one CSV table for the report."""
    write_csv(data, out)
