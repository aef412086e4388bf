"""python -m workflow_scripts.rehearsal CONFIG FOLDER: lay out the stand-ins of CONFIG."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from workflow_scripts.rehearsal import RehearsalError
from workflow_scripts.rehearsal.stand_ins import lay_out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m workflow_scripts.rehearsal",
        description="Lay out offline stand-ins of every model and dataset a config names; then "
        "run it with: snakemake --configfile CONFIG --config rehearsal=FOLDER",
    )
    parser.add_argument("config", help="a workflow config (e.g. configs/study.yaml)")
    parser.add_argument("folder", help="where to lay out the stand-ins (and run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = yaml.safe_load(Path(args.config).read_text())
    try:
        done = lay_out(config, Path(args.folder))
    except RehearsalError as error:
        sys.exit(f"rehearsal: {error}")
    for kind, items in done.items():
        print(f"{kind}: {len(items)}")
    print(f"run: snakemake --configfile {args.config} --config rehearsal={args.folder} --cores all")


if __name__ == "__main__":
    main()
