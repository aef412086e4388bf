"""merge_stats: the per-layer statistics of a model and dataset in one Parquet file."""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from workflow_scripts.atomic import write_parquet


def merge(paths: list[str]) -> pd.DataFrame:
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    layers = frame["layer"].unique()
    if sorted(layers) != list(range(len(paths))):
        raise ValueError(f"expected layers 0..{len(paths) - 1}, got {sorted(layers)}")
    return frame.sort_values("layer", kind="stable").reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", required=True, help="per-layer Parquet files")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    frame = merge(args.layers)
    write_parquet(frame, args.out)
    print(f"wrote {args.out}: {len(frame)} records", file=sys.stderr)


if __name__ == "__main__":
    main()
