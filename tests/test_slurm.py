"""profiles/slurm on a real SLURM: scripts/slurm-localhost.sh installs and starts a single-node
SLURM on this machine (Debian, root, apt), the tiny test config (tests/configs/tiny.yaml) runs
through it with the profile, and gives the same statistics and ablation results as a local run.

Fails, not skips, where SLURM cannot be installed or started: CI runs this on a fresh machine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from support import REPO, environment, job_counts, load_config

TINY_CONFIG = load_config("tiny")
pytestmark = pytest.mark.workflow

SCRIPT = REPO / "scripts/slurm-localhost.sh"
RESULTS = [
    "results/stats/gpt2-tiny/pairs.parquet",
    "results/stats/roberta-tiny/pairs.parquet",
    "results/stats/resnet-tiny/shapes.parquet",
    "results/ablation/roberta-tiny/pairs.parquet",
    "results/ablation/resnet-tiny/shapes.parquet",
]
GPU_RULES = {"extract", "ablate", "train"}  # profiles/slurm asks for `gpu: 1`
LOCAL_RULES = {"fetch_model", "all"}

# What the profile leaves as on a real cluster and the one-node test cluster needs changed:
SLURM_OVERRIDES = [
    # the plugin's first status check comes 40 s after a submission; tiny jobs take seconds
    "--slurm-init-seconds-before-status-checks",
    "2",
    # the node has 2 CPUs: 1-CPU jobs run two at a time (the profile gives layer_stats 4 threads,
    # which this node could not run at all); it also keeps the thread counts of the local run
    "--max-threads",
    "1",
    # no slurmdbd here, so no accounts; the plugin's guess would only log warnings
    "--slurm-no-account",
]
# The GPU requests stay: the test cluster offers two stand-in GPUs, so extract and ablate are
# scheduled with --gpus=1 as on a cluster, find no CUDA device and run on the CPU.


def start_snakemake(workdir, *args, timeout: int) -> subprocess.Popen:
    """Snakemake in workdir, under `timeout -k` (SIGTERM alone does not stop it while jobs run),
    its output in workdir/snakemake.out."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    command = [
        "timeout",
        "-k",
        "10",
        str(timeout),
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        *args,
    ]
    # each run in its own output cache (profiles/default turns it on): in the working directory
    env = {k: v for k, v in environment().items() if k != "SNAKEMAKE_OUTPUT_CACHE"}
    with open(workdir / "snakemake.out", "w") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def finish(process: subprocess.Popen, workdir) -> str:
    process.wait()
    output = (workdir / "snakemake.out").read_text()
    assert process.returncode == 0, f"exit {process.returncode}:\n{output[-6000:]}"
    return output


def slurm_localhost(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def slurm():
    """A running single-node SLURM; stopped afterwards unless it ran before the test."""
    ran_before = slurm_localhost("status").returncode == 0
    try:
        for command in ("install", "start"):
            result = slurm_localhost(command)
            assert result.returncode == 0, (
                f"scripts/slurm-localhost.sh {command} failed (needs root and apt):\n"
                f"{result.stdout}{result.stderr}"
            )
        yield
    finally:
        if not ran_before:
            slurm_localhost("stop")
            assert slurm_localhost("status").returncode != 0, "SLURM daemons still running"


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    """The tiny config through SLURM with profiles/slurm, and locally with --cores 2 and no
    --profile (profiles/default, the workflow profile, applies to both, as it does for users), at
    the same time: the SLURM run leaves the CPUs idle while it polls. Locally only the results
    that are compared."""
    slurm_dir, local_dir = (tmp_path_factory.mktemp(name) for name in ("slurm", "local"))
    local = start_snakemake(local_dir, "--cores", "2", *RESULTS, timeout=600)
    processes = [local]
    try:
        processes.append(
            start_snakemake(
                slurm_dir, "--profile", str(REPO / "profiles/slurm"), *SLURM_OVERRIDES, timeout=600
            )
        )
        slurm_output = finish(processes[1], slurm_dir)
        finish(local, local_dir)
    finally:
        for process in processes:  # after a failure: stop what still runs, with its jobs
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return SimpleNamespace(slurm_dir=slurm_dir, slurm_output=slurm_output, local_dir=local_dir)


def submitted(output: str) -> dict[int, str]:
    """SLURM job id -> rule, from Snakemake's 'submitted with SLURM jobid' lines."""
    found = re.findall(
        r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/", output
    )
    return {int(jobid): rule for jobid, rule in found}


def slurm_jobs() -> dict[int, dict[str, str]]:
    """Every job slurmctld still knows (MinJobAge=3600), as its `scontrol show job` fields."""
    lines = subprocess.run(
        ["scontrol", "show", "job", "--oneliner"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.splitlines()
    jobs = (dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines if "JobId=" in line)
    return {int(job["JobId"]): job for job in jobs}


def test_every_job_but_the_local_rules_is_a_slurm_job(runs):
    planned = job_counts(runs.slurm_output)  # its "Job stats"
    expected = {rule: n for rule, n in planned.items() if rule not in LOCAL_RULES | {"total"}}
    assert {"extract", "layer_stats", "ablate", "figure_kurtosis"} <= set(expected)
    jobs = submitted(runs.slurm_output)
    counts = {rule: list(jobs.values()).count(rule) for rule in set(jobs.values())}
    assert counts == expected


def test_the_slurm_jobs_ran_with_the_profiles_resources(runs):
    jobs = submitted(runs.slurm_output)
    known = slurm_jobs()
    assert set(jobs) <= set(known), "SLURM does not know some of the job ids Snakemake reported"
    assert len({known[jobid]["JobName"] for jobid in jobs}) == 1  # the plugin names them by run
    for jobid, rule in jobs.items():
        job = known[jobid]
        assert job["JobState"] == "COMPLETED", (rule, job["JobState"])
        assert job["NumCPUs"] == "1", (rule, job)  # cpus_per_task: threads, capped by --max-threads
        assert ("gpu" in job.get("TresPerJob", "")) == (rule in GPU_RULES), (rule, job)


def test_slurm_and_local_runs_give_the_same_results(runs):
    for path in RESULTS:
        pd.testing.assert_frame_equal(
            pd.read_parquet(runs.slurm_dir / path), pd.read_parquet(runs.local_dir / path), obj=path
        )
