"""The command line of :mod:`workflow_scripts.stream`:

    python -m workflow_scripts.stream info results/activations/gpt2-init/corpus
    python -m workflow_scripts.stream export results/activations/gpt2-init/corpus \\
        --readouts 3 4 --out gpt2-init-corpus-hf

``info`` prints an activation set's read-out points, rows and digests; ``export`` writes
read-out points as a Hugging Face dataset (:func:`workflow_scripts.stream.exporting.export`).
Bad input ends with one line naming it, and exit status 1.
"""

from __future__ import annotations

import argparse
import sys

from workflow_scripts.stage import InputError
from workflow_scripts.stream import ActivationSet, open_activations
from workflow_scripts.stream.exporting import export


def _describe(acts: ActivationSet) -> str:
    lines = [
        f"{acts.name}: {acts.rows} rows in {len(acts.shards)} shard(s), stored as {acts.dtype}, "
        f"{acts.modality or 'unknown modality'}, pooling {acts.pooling}",
        "read-out points (index, stage, block, name, width):",
    ]
    for r in acts.readouts:
        lines.append(f"  {r.index:3d}  {r.stage:3d}  {r.block:3d}  {r.name}  {r.width}")
    lines += [f"digests.{k}: {v}" for k, v in acts.digests.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workflow_scripts.stream",
        description="Read the stored residual stream: describe an activation set, or export "
        "read-out points as a Hugging Face dataset.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="an activation set's read-out points and digests")
    info.add_argument("folder", help="results/activations/<model>/<dataset>")
    out = commands.add_parser("export", help="read-out points as a Hugging Face dataset (Arrow)")
    out.add_argument("folder", help="results/activations/<model>/<dataset>")
    out.add_argument("--readouts", type=int, nargs="+", required=True, metavar="K")
    out.add_argument("--out", required=True, help="the dataset folder to write")
    out.add_argument("--include-padding", action="store_true", help="keep padding rows")
    out.add_argument("--no-tokens", action="store_true", help="no token column")
    out.add_argument("--model-dir", help="the model (default: results/models/<model>)")
    out.add_argument("--data", help="the dataset file (default: results/data/<dataset>.parquet)")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(_describe(open_activations(args.folder)))
            return 0
        path = export(
            open_activations(args.folder, readouts=args.readouts),
            args.readouts,
            args.out,
            include_padding=args.include_padding,
            tokens=False if args.no_tokens else None,
            model_dir=args.model_dir,
            data=args.data,
        )
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
