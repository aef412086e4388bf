"""Helpers the tests share: the repository, the test configs (tests/configs/*.yaml) and
running Snakemake the way a user does, from the project's environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).with_name("configs")


# what a copy of the workflow needs (the tests that edit its code run a copy)
WORKFLOW_FILES = (
    "Snakefile",
    "rules",
    "scripts",
    "workflow_scripts",
    "envs",
    "report",
    "config.yaml",
)


def copy_workflow(checkout: Path) -> None:
    """A copy of the workflow at ``checkout``, for a test that edits its code."""
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            checkout.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, checkout / name)


def load_config(name: str) -> dict:
    """A fresh copy of the test config ``tests/configs/<name>.yaml``."""
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


TINY_SPECS = load_config("models")


def environment(**variables: str) -> dict:
    """The environment of a Snakemake run: this Python's environment first on PATH (the rules'
    scripts run with the ``python`` found there), plus ``variables``."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **variables}


def hub_snapshot(cache: Path, repo: str, files: Path, commit: str) -> None:
    """Lay out the files of the folder ``files`` in the Hugging Face hub cache ``cache`` as what
    huggingface_hub downloads of ``repo`` at ``commit``, with ``main`` pointing at it (plain
    files where it would link to blobs): ``hf:<repo>`` then resolves offline."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(files, root / "snapshots" / commit, ignore=shutil.ignore_patterns("manifest*"))


def run_stage(rule: str, cache: Path | None = None, **named: str) -> subprocess.CompletedProcess:
    """One stage run as its job runs it (``python -m workflow_scripts.stage``), offline, with
    ``cache`` as the Hugging Face hub cache."""
    hub = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)} if cache else {}
    return subprocess.run(
        [sys.executable, "-m", "workflow_scripts.stage", rule]
        + [f"{name}={value}" for name, value in named.items()],
        cwd=REPO,
        env=environment(**hub),
        capture_output=True,
        text=True,
        timeout=300,
    )


def snakemake(
    workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile", timeout=600, **variables
):
    """Run Snakemake on ``workdir/config.yaml`` with two cores and the environment
    ``variables``; the finished process."""
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(snakefile),
        "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"),
        "--cores", "2", *args,
    ]  # fmt: skip
    # run from the working directory, as a user does: `python -m` puts the current directory
    # first on the path, and the jobs run there
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=environment(**variables),
        cwd=workdir,
    )  # fmt: skip


def job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a Snakemake run's output, as {rule: jobs}; {} for nothing."""
    if "Nothing to be done" in output:
        return {}
    table = output[output.index("Job stats") :]
    return {k: int(v) for k, v in re.findall(r"^(\w+)\s+(\d+)$", table, re.M)}


# extraction options of the tests: small batches, chunks and shards
# the ablation options of the tests that score a model directly (small batches, on the CPU)
ABLATION_OPTIONS = {
    "batch_size": 8,
    "max_tokens": 48,
    "padding": "longest",
    "device": "cpu",
    "autocast": None,
    "final_norm": True,
    "shortcut_relu": True,
}
EXTRACT_OPTIONS = {
    "dtype": "float16",
    "batch_size": 5,
    "max_tokens": 40,
    "padding": "longest",
    "rows_per_example": None,
    "device": "cpu",
    "autocast": None,
    "chunk_rows": 16,
    "chunks_per_shard": 4,
    "compression": "none",
    "gpt2_final_readout": "raw",
    "seed": 0,
}


def stats_options(**settings):
    """Statistics options: the schema's defaults (on the CPU), with ``settings`` over them."""
    from workflow_scripts.config import load_schema
    from workflow_scripts.options.stats import StatsOptions

    properties = load_schema()["definitions"]["stats"]["properties"]
    defaults = {k: v["default"] for k, v in properties.items() if k != "thresholds"}
    return StatsOptions(**{**defaults, "device": "cpu", **settings})


def offline_dry_run(configfile: Path, workdir: Path) -> tuple[dict[str, int], float]:
    """``snakemake -n`` of ``configfile`` with no network: the job count of each rule (and
    ``total``) and the seconds it took."""
    offline = environment(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        https_proxy="http://0.0.0.0:9",
        http_proxy="http://0.0.0.0:9",
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
        + ["--directory", str(workdir), "--configfile", str(configfile), "-n", "--quiet", "rules"],
        capture_output=True,
        text=True,
        timeout=300,
        env=offline,
    )
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-4000:]
    counts = re.findall(r"^(\w+)\s+(\d+)$", result.stdout + result.stderr, re.M)
    return {rule: int(n) for rule, n in counts}, seconds
