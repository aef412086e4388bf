"""Which optimizers give the residual stream of a small language model a privileged basis.

The default config's ``gptr2-nano`` run (config.yaml: the same arch, data, steps, batch size and
warm-up) is trained with each of six optimizers, three seeds each (``seeds: [0, 1, 2]``, runs
``gptr2-nano-<optimizer>-s<seed>``):

  adam          adam, lr 0.003 (the default config's)
  adamw         adamw, lr 0.003, weight_decay 0.1
  sgd           sgd, lr 0.3, momentum 0.9 (the default config's)
  muon          muon, lr 0.02, adamw_lr 0.003
  adafactor     adafactor, lr 0.01
  adam-rotated  adam, lr 0.003, basis: rotated (Adam's coordinates of the stream are a fixed
                random orthogonal basis, one per seed: the same model function and data)

and their statistics are computed on the default config's ``corpus`` analysis set, beside the
untrained control ``gptr2-init``. Nothing else of the default config runs: no ResNets, no
RoBERTa, no ablation, no figures (``figures.training: false``).

It runs as a user would: the config is written to a fresh working directory and the workflow
runs there, ``python -m snakemake --snakefile <checkout>/Snakefile --directory WORKDIR
--configfile WORKDIR/config.yaml --cores 2``, with ``RESIDUAL_STREAMS_CACHE`` a folder inside
WORKDIR (so every job runs) or ``off``.

Printed, from ``results/stats/<model>/corpus.parquet``:

* the mean kurtosis (standard basis) per read-out point for each optimizer, mean ± sd over the
  three seeds (sd with ddof 1), and the same for the rotated kurtosis; ``init`` is gptr2-init;
* the training time of every run, two ways, and each optimizer's mean as a ratio to adam's:
  ``job s``, the train job's wall time from Snakemake's log (its start and "Finished" lines,
  whole seconds: interpreter, imports, data, the step loop, saving); ``loop s``, the step loop
  alone, as the train stage logs it in ``results/logs/train/<run>.log`` ("waited for data ...
  (w s of T s ...)"). (The train log's own timestamped lines are both written after the loop,
  so their span is not the training time.) A train job asks for 8 threads, so with ``--cores 2``
  it holds both cores and train jobs run one at a time, with nothing beside them.

The last line is JSON: ``seconds_over_adam`` (job wall time, mean of the seeds, over adam's),
``loop_seconds_over_adam`` (the same for the step loop), ``final_layer_kurtosis`` and
``final_layer_rotated_kurtosis`` (``[mean, sd]`` over seeds at the last read-out point), and the
run's settings.

Run from the repository root (about 10 minutes on 2 cores):

    .venv/bin/python benchmarks/optimizer_study.py
    .venv/bin/python benchmarks/optimizer_study.py --steps 200 --rows 200   # quicker
    .venv/bin/python benchmarks/optimizer_study.py --workdir /tmp/opt --cache off   # keep it
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
RUN = "gptr2-nano"  # the default config's run
CONTROL = "gptr2-init"  # its untrained control
ANALYSIS = "corpus"  # the analysis set
SEEDS = [0, 1, 2]
CORES = 2
# grid label -> the run's optimizer
OPTIMIZERS = {
    "adam": {"name": "adam", "lr": 0.003},
    "adamw": {"name": "adamw", "lr": 0.003, "weight_decay": 0.1},
    "sgd": {"name": "sgd", "lr": 0.3, "momentum": 0.9},
    "muon": {"name": "muon", "lr": 0.02, "adamw_lr": 0.003},
    "adafactor": {"name": "adafactor", "lr": 0.01},
    "adam-rotated": {"name": "adam", "lr": 0.003, "basis": "rotated"},
}
METRICS = {
    "kurtosis": "mean kurtosis",
    "rotated_kurtosis": "mean rotated kurtosis",
    # of a run whose optimizer worked in a rotated basis Q only: the stream's kurtosis in Q's
    # coordinates (x @ Q), where that optimizer saw it (layer_stats' optimizer_basis_kurtosis)
    "optimizer_basis_kurtosis": "mean kurtosis in the optimizer's own basis (x @ Q)",
}


def study_config(steps: int | None, rows: int | None) -> dict:
    """The default config cut down to the gptr2-nano optimizer grid with seeds and its control,
    analysed on ``corpus``."""
    default = yaml.safe_load((REPO / "config.yaml").read_text())
    run = copy.deepcopy(default["training"]["runs"][RUN])
    run["grid"] = {"optimizer": {k: {"optimizer": v} for k, v in OPTIMIZERS.items()}}
    run["seeds"] = list(SEEDS)
    if steps is not None:
        run["steps"] = steps
    corpus = dict(default["datasets"][ANALYSIS])
    if rows is not None:
        corpus["rows"] = rows
    config = {
        key: copy.deepcopy(value)
        for key, value in default.items()
        if key not in ("models", "training", "datasets", "analyses", "ablation", "figures")
    }
    config["models"] = {CONTROL: copy.deepcopy(default["models"][CONTROL])}
    config["training"] = {"runs": {RUN: run}}
    config["datasets"] = {ANALYSIS: corpus, run["dataset"]: default["datasets"][run["dataset"]]}
    config["analyses"] = [
        {"models": [CONTROL, *(f"{RUN}-{label}" for label in OPTIMIZERS)], "datasets": [ANALYSIS]}
    ]
    config["figures"] = {"groups": {}, "training": False}
    return config


def run_name(label: str, seed: int) -> str:
    return f"{RUN}-{label}-s{seed}"


def snakemake(work: Path, cache: str) -> float:
    """Run the workflow in ``work``; its wall time. Its output goes to ``work/snakemake.out``."""
    env = dict(os.environ)
    env["RESIDUAL_STREAMS_CACHE"] = cache
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(work),
        "--configfile",
        str(work / "config.yaml"),
        "--cores",
        str(CORES),
    ]
    print(f"  RESIDUAL_STREAMS_CACHE={cache} {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(work / "snakemake.out", "w") as out:
        process = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        text = (work / "snakemake.out").read_text()
        raise RuntimeError(f"snakemake failed ({process.returncode}):\n{text[-6000:]}")
    return seconds


STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")


def job_seconds(work: Path, rule: str = "train") -> dict[str, float]:
    """The wall time of each ``rule`` job, by its model, from Snakemake's log of the run: the
    timestamp before its "rule" line to the one before its "Finished" line (whole seconds)."""
    seconds = {}
    for log in sorted((work / ".snakemake" / "log").glob("*.snakemake.log")):  # the latest wins
        seconds.update(_job_seconds(log.read_text(), rule))
    return seconds


def _job_seconds(text: str, rule: str) -> dict[str, float]:
    when, started, model_of, finished = None, {}, {}, {}
    current = None
    for line in text.splitlines():
        if found := STAMP.match(line.strip()):
            when = datetime.strptime(found.group(1), "%a %b %d %H:%M:%S %Y")
            continue
        if re.match(rf"^(local)?rule {rule}:", line):
            current = {"start": when}
            continue
        if current is not None:
            if found := re.match(r"^\s+jobid: (\d+)", line):
                current["jobid"] = found.group(1)
            elif found := re.match(r"^\s+wildcards: .*model=([^,\s]+)", line):
                current["model"] = found.group(1)
            if "jobid" in current and "model" in current:
                started[current["jobid"]] = current["start"]
                model_of[current["jobid"]] = current["model"]
                current = None
        if found := re.search(r"Finished job(?:id)?:? (\d+)", line):
            finished[found.group(1)] = when
    return {
        model_of[j]: (finished[j] - started[j]).total_seconds() for j in started if j in finished
    }


def loop_seconds(work: Path, model: str) -> float:
    """The train stage's step loop, in seconds, from its log."""
    text = (work / "results" / "logs" / "train" / f"{model}.log").read_text()
    found = re.search(r"waited for data [\d.]+% of the time \(([\d.]+) s of ([\d.]+) s", text)
    return float(found.group(2)) if found else float("nan")


def final_loss(work: Path, model: str) -> tuple[float, float]:
    metrics = pd.read_parquet(work / "results" / "train" / model / "metrics.parquet")
    accuracy = metrics["eval_accuracy"].dropna()
    return float(metrics["loss"].iloc[-1]), float(accuracy.iloc[-1])


def kurtosis_tables(work: Path) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per metric: layer x optimizer, the mean over seeds and its sd (two frames), of the
    optimizers whose runs have that metric (a metric none has is left out)."""
    frames = []
    models = [CONTROL] + [run_name(label, s) for label in OPTIMIZERS for s in SEEDS]
    for model in models:
        frame = pd.read_parquet(work / "results" / "stats" / model / f"{ANALYSIS}.parquet")
        frame = frame[frame["metric"].isin(METRICS)]
        settings = frame.groupby("metric")["setting"].nunique(dropna=False)
        if (settings > 1).any():
            raise ValueError(f"{model}: several settings of one metric: {settings.to_dict()}")
        frame = frame.assign(
            model=model,
            optimizer="init" if model == CONTROL else model[len(RUN) + 1 :].rsplit("-s", 1)[0],
        )
        frames.append(frame[["optimizer", "model", "layer", "metric", "value"]])
    long = pd.concat(frames, ignore_index=True)
    tables = {}
    order = ["init", *OPTIMIZERS]
    for metric in METRICS:
        part = long[long["metric"] == metric]
        if part.empty:
            continue
        grouped = part.groupby(["layer", "optimizer"])["value"]
        columns = [o for o in order if o in set(part["optimizer"])]
        counts = part.groupby("optimizer")["model"].nunique()
        if (counts[columns[1:] if columns[0] == "init" else columns] != len(SEEDS)).any():
            raise ValueError(f"{metric}: not every seed has it: {counts.to_dict()}")
        tables[metric] = (grouped.mean().unstack()[columns], grouped.std(ddof=1).unstack()[columns])
    return tables


def markdown(mean: pd.DataFrame, sd: pd.DataFrame) -> str:
    header = "| read-out | " + " | ".join(mean.columns) + " |"
    rule = "|---:|" + "---:|" * len(mean.columns)
    lines = [header, rule]
    for layer in mean.index:
        cells = []
        for column in mean.columns:
            m, s = mean.loc[layer, column], sd.loc[layer, column]
            cells.append(f"{m:.2f}" if pd.isna(s) else f"{m:.2f} ± {s:.2f}")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rounded(value) -> float | None:
    """A number for the JSON line: 3 decimals, NaN (the control's sd) as null."""
    return None if pd.isna(value) else round(float(value), 3)


def report(work: Path, config: dict, seconds: float | None) -> dict:
    """Print the tables of a finished working directory; the summary of the JSON line."""
    tables = kurtosis_tables(work)
    jobs = job_seconds(work)
    rows = []
    for label in OPTIMIZERS:
        for seed in SEEDS:
            model = run_name(label, seed)
            loss, accuracy = final_loss(work, model)
            rows.append(
                {
                    "optimizer": label,
                    "run": model,
                    "job s": jobs.get(model, float("nan")),
                    "loop s": loop_seconds(work, model),
                    "final loss": loss,
                    "held-out accuracy": accuracy,
                }
            )
    timing = pd.DataFrame(rows)
    for metric, (mean, sd) in tables.items():
        print(f"\n### {METRICS[metric]} per read-out point on {ANALYSIS}, mean ± sd over seeds\n")
        print(markdown(mean, sd))
    missing = [m for m in METRICS if m not in tables]
    if missing:
        print(f"\n(no records of {', '.join(missing)} in the statistics files)")
    per = timing.groupby("optimizer", sort=False)[["job s", "loop s"]].mean()
    ratio = per / per.loc["adam"]
    print("\n### training time per run\n")
    print("| run | job s | loop s | final loss | held-out accuracy |")
    print("|---|---:|---:|---:|---:|")
    for r in timing.itertuples(index=False):
        print(f"| {r.run} | {r[2]:.0f} | {r[3]:.1f} | {r[4]:.3f} | {r[5]:.3f} |")
    print("\n### training time, mean over seeds, as a ratio to adam's\n")
    print("| optimizer | job s | loop s | job / adam | loop / adam |")
    print("|---|---:|---:|---:|---:|")
    for label in OPTIMIZERS:
        p, q = per.loc[label], ratio.loc[label]
        print(
            f"| {label} | {p['job s']:.1f} | {p['loop s']:.1f} | {q['job s']:.2f} | "
            f"{q['loop s']:.2f} |"
        )
    summary = {
        "seconds_over_adam": {k: rounded(v) for k, v in ratio["job s"].items()},
        "loop_seconds_over_adam": {k: rounded(v) for k, v in ratio["loop s"].items()},
    }
    for metric, (mean, sd) in tables.items():
        last = mean.index.max()
        summary[f"final_layer_{metric}"] = {
            k: [rounded(mean.loc[last, k]), rounded(sd.loc[last, k])] for k in mean.columns
        }
    summary.update(
        steps=config["training"]["runs"][RUN]["steps"],
        rows=config["datasets"][ANALYSIS]["rows"],
        seeds=SEEDS,
        snakemake_s=None if seconds is None else round(seconds),
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="training steps (default: config.yaml's)")
    parser.add_argument("--rows", type=int, help="rows of the corpus set (default: config.yaml's)")
    parser.add_argument("--workdir", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument(
        "--cache",
        default="inside",
        help="RESIDUAL_STREAMS_CACHE: 'inside' (a fresh folder in the working directory) or 'off'",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: print the tables of the finished --workdir (its config.yaml)",
    )
    args = parser.parse_args(argv)
    if args.report_only and args.workdir is None:
        parser.error("--report-only needs --workdir")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="optimizer-study-") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        wall = work / "snakemake-seconds.txt"
        if args.report_only:
            config = yaml.safe_load((work / "config.yaml").read_text())
            seconds = float(wall.read_text()) if wall.exists() else None
        else:
            config = study_config(args.steps, args.rows)
            work.mkdir(parents=True, exist_ok=True)
            (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        run = config["training"]["runs"][RUN]
        print(
            f"{RUN}: arch {run['arch']}, {run['steps']} steps, batch {run['batch_size']}, "
            f"context {run['context']}, seeds {SEEDS}; {ANALYSIS}: "
            f"{config['datasets'][ANALYSIS]['rows']} rows; {CORES} cores, {os.cpu_count()} CPUs"
        )
        if not args.report_only:
            cache = str(work / "cache") if args.cache == "inside" else args.cache
            seconds = snakemake(work, cache)
            wall.write_text(f"{seconds:.1f}\n")
            print(f"  snakemake: {seconds:.0f} s")
        summary = report(work, config, seconds)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
