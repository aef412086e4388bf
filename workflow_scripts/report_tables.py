"""tables: the statistics and ablation results of every model and dataset as one CSV each, for
the HTML report (which shows CSV files as tables)."""

from __future__ import annotations

import argparse

import pandas as pd

from workflow_scripts.atomic import written


def write_csv(paths: list[str], out: str) -> None:
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    with written(out) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", nargs="+", required=True, help="Parquet files")
    parser.add_argument("--out", required=True, help="the CSV file")
    args = parser.parse_args(argv)
    write_csv(args.inputs, args.out)


if __name__ == "__main__":
    main()
