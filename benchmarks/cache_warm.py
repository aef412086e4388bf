"""The default workflow with a warm output cache against a cold run, side by side in one run.

In a temporary folder (a copy of the workflow, an empty cache): runs the default workflow cold
(every job computes and stores its outputs in the cache), deletes ``results/``, and runs it again
with the cache warm (every job links its outputs from the cache). Prints both wall times and
their ratio; the target is a warm run under 20% of the cold one. Both runs use the same number of
cores and the same Snakemake options as `make run` (profiles/default; every job uses the cache).

    .venv/bin/python benchmarks/cache_warm.py              # the default workflow, about 6 min
    .venv/bin/python benchmarks/cache_warm.py --cores 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = (
    "Snakefile",
    "rules",
    "scripts",
    "workflow_scripts",
    "envs",
    "report",
    "config.yaml",
    "profiles",
)


def timed_run(checkout: Path, cache: Path, cores: int) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", str(cores), "--quiet", "all"],
        cwd=checkout,
        env={**os.environ, "RESIDUAL_STREAMS_CACHE": str(cache)},
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"the workflow failed:\n{result.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkout, cache = Path(tmp, "checkout"), Path(tmp, "cache")
        cache.mkdir()
        for name in WORKFLOW_FILES:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(
                    source, checkout / name, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                checkout.mkdir(exist_ok=True)
                shutil.copy2(source, checkout / name)
        cold = timed_run(checkout, cache, args.cores)
        entries = len(list(cache.iterdir()))
        shutil.rmtree(checkout / "results")
        warm = timed_run(checkout, cache, args.cores)
    print(f"default workflow on {args.cores} cores, {entries} cache entries")
    print(f"  cold (empty cache):            {cold:8.1f} s")
    print(f"  warm (results/ deleted):       {warm:8.1f} s")
    print(
        f"  warm / cold:                   {warm / cold:8.3f}   [target < 0.2: "
        f"{'ok' if warm / cold < 0.2 else 'ABOVE TARGET'}]"
    )


if __name__ == "__main__":
    main()
