"""profiles/slurm on a real SLURM: scripts/slurm-localhost.sh installs and starts a single-node
SLURM on this machine (Debian, root, apt), the tiny test config (tests/configs/tiny.yaml) runs
through it with the profile, and gives the same statistics and ablation results as a local run;
a second checkout sharing the first's output cache computes nothing; a training job cancelled
(scancel) or requeued (scontrol requeue) midway resumes and ends as an unbroken run.

Fails, not skips, where SLURM cannot be installed or started: CI runs this on a fresh machine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from support import REPO, environment, job_counts, load_config

TINY_CONFIG = load_config("tiny")
TRAINING_CONFIG = load_config("interrupted")  # one small language model, checkpoints every 20
TRAINED = ["results/train/lm/metrics.parquet", "results/models/lm"]
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
    # and polls every 10 s after that
    "--seconds-between-status-checks",
    "2",
    # the node has 2 CPUs: 1-CPU jobs run two at a time (the profile gives layer_stats 4 threads,
    # which this node could not run at all); it also keeps the thread counts of the local run
    "--max-threads",
    "1",
    # no slurmdbd here, so no accounts; the plugin's guess would only log warnings
    "--slurm-no-account",
    # keep every job's SLURM log, to read what the job did
    "--slurm-keep-successful-logs",
]
# The GPU requests stay: the test cluster offers two stand-in GPUs, so extract and ablate are
# scheduled with --gpus=1 as on a cluster, find no CUDA device and run on the CPU.


def start_snakemake(
    workdir, *args, timeout: int, config: dict = TINY_CONFIG, cache: Path | None = None
) -> subprocess.Popen:
    """Snakemake in workdir, under `timeout -k` (SIGTERM alone does not stop it while jobs run),
    its output in workdir/snakemake.out; its output cache in ``cache``, else in the working
    directory (profiles/default turns the cache on)."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
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
    env = {k: v for k, v in environment().items() if k != "SNAKEMAKE_OUTPUT_CACHE"}
    if cache is not None:
        env["SNAKEMAKE_OUTPUT_CACHE"] = str(cache)
    with open(workdir / "snakemake.out", "w") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def through_slurm(workdir, *args, **options) -> subprocess.Popen:
    return start_snakemake(
        workdir, "--profile", str(REPO / "profiles/slurm"), *SLURM_OVERRIDES, *args, **options
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
    that are compared. Then a second checkout through SLURM, sharing the first's cache folder."""
    slurm_dir, again_dir, local_dir = (
        tmp_path_factory.mktemp(name) for name in ("slurm", "slurm-again", "local")
    )
    cache = tmp_path_factory.mktemp("shared-cache")
    local = start_snakemake(local_dir, "--cores", "2", *RESULTS, timeout=600)
    processes = [local]
    try:
        start = time.monotonic()
        processes.append(through_slurm(slurm_dir, timeout=600, cache=cache))
        slurm_output = finish(processes[-1], slurm_dir)
        first_seconds = time.monotonic() - start
        finish(local, local_dir)
        start = time.monotonic()
        processes.append(through_slurm(again_dir, timeout=600, cache=cache))
        again_output = finish(processes[-1], again_dir)
        again_seconds = time.monotonic() - start
    finally:
        stop(processes)
    print(
        f"first checkout: {first_seconds:.0f} s, {len(submitted(slurm_output))} SLURM jobs; "
        f"second, from the cache: {again_seconds:.0f} s, {len(submitted(again_output))} jobs"
    )
    return SimpleNamespace(
        slurm_dir=slurm_dir,
        slurm_output=slurm_output,
        local_dir=local_dir,
        again_dir=again_dir,
        again_output=again_output,
    )


def stop(processes: list[subprocess.Popen]) -> None:
    """After a failure: stop what still runs, with its jobs."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def submitted(output: str) -> dict[int, str]:
    """SLURM job id -> rule, from Snakemake's 'submitted with SLURM jobid' lines."""
    return {jobid: rule for jobid, (rule, _) in submitted_logs(output).items()}


def submitted_logs(output: str) -> dict[int, tuple[str, str]]:
    """SLURM job id -> (rule, the job's SLURM log)."""
    found = re.findall(
        r"submitted with SLURM jobid (\d+) \(log: (\S*/slurm_logs/rule_(\w+)/\S*)\)", output
    )
    return {int(jobid): (rule, log) for jobid, log, rule in found}


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


def test_the_profiles_name_every_cached_rule(tmp_path, monkeypatch):
    """profiles/default names the cached rules one by one (a bare --cache does not reach SLURM
    jobs): exactly the rules with `cache: True`."""
    # the Snakefile, parsed in this process, sets the cache folder and cleans results/ where it
    # runs: here, not in the checkout, and not for the tests that run after this one
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SNAKEMAKE_OUTPUT_CACHE", str(tmp_path / "cache"))
    from snakemake.api import SnakemakeApi
    from snakemake.caching.rule import CacheFlag
    from snakemake.settings.types import ConfigSettings, ResourceSettings

    profile = yaml.safe_load((REPO / "profiles/default/config.yaml").read_text())
    with SnakemakeApi() as api:
        workflow = api.workflow(
            snakefile=REPO / "Snakefile",
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=[REPO / "config.yaml"]),
            workdir=tmp_path,
        )._workflow
        cached = {r.name for r in workflow.rules if r.cache and r.cache.flag & CacheFlag.output}
    assert sorted(profile["cache"]) == sorted(cached)
    assert "cache" not in yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())


def test_a_second_checkout_sharing_the_cache_computes_nothing_through_slurm(runs):
    first, again = submitted(runs.slurm_output), submitted_logs(runs.again_output)
    assert sorted(rule for rule, _ in again.values()) == sorted(first.values())
    for rule, log in again.values():
        text = Path(runs.again_dir, log).read_text()
        assert "from cache" in text, (rule, text[-2000:])  # Snakemake: "Symlinking ... from cache"
        assert "to cache" not in text, (rule, text[-2000:])  # nothing stored: nothing computed
    # the jobs' own logs are written by their commands only (Snakemake creates them empty):
    # none ran
    written = [p for p in (runs.again_dir / "results/logs").rglob("*.log") if p.stat().st_size]
    assert not written, written
    assert all(p.stat().st_size for p in (runs.slurm_dir / "results/logs/extract").rglob("*.log"))
    for path in RESULTS:
        pd.testing.assert_frame_equal(
            pd.read_parquet(runs.again_dir / path), pd.read_parquet(runs.slurm_dir / path), obj=path
        )


def when(condition, process: subprocess.Popen, workdir, seconds=300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, (workdir / "snakemake.out").read_text()[-4000:]
        assert time.monotonic() < deadline, "the moment never came"
        time.sleep(0.2)


def training_job(workdir) -> int:
    jobs = submitted((workdir / "snakemake.out").read_text())
    return next(jobid for jobid, rule in jobs.items() if rule == "train")


def training_checkpointed(workdir) -> bool:
    """The training job runs in SLURM and has written a checkpoint."""
    return (workdir / "results/train/lm/checkpoint.pt").exists() and "rule_train/" in (
        workdir / "snakemake.out"
    ).read_text()


def interrupt(workdir, how: str, processes: list, **options) -> None:
    """Run the training config through SLURM and stop its training job midway: ``cancelled``
    (scancel: the run fails, and `snakemake` is run again) or ``requeued`` (scontrol requeue:
    SLURM reruns the job, and Snakemake waits for it). Both runs' output in snakemake.out."""
    process = through_slurm(workdir, *TRAINED, **options)
    processes.append(process)
    when(lambda: training_checkpointed(workdir), process, workdir)
    jobid = str(training_job(workdir))
    if how == "requeued":
        subprocess.run(["scontrol", "requeue", jobid], check=True, timeout=30)
        finish(process, workdir)
        return
    subprocess.run(["scancel", jobid], check=True, timeout=30)
    process.wait()
    first = (workdir / "snakemake.out").read_text()
    assert process.returncode != 0, first[-3000:]  # the cancelled job failed the run
    processes.append(through_slurm(workdir, *TRAINED, **options))
    second = finish(processes[-1], workdir)
    (workdir / "snakemake.out").write_text(first + second)


@pytest.fixture(scope="module")
def preempted(slurm, tmp_path_factory):
    """A training run through SLURM stopped midway, cancelled or requeued (the two at once, in
    two checkouts), beside an unbroken local run of the same config."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("unbroken", "cancelled", "requeued")}
    options = {"timeout": 600, "config": TRAINING_CONFIG}
    processes = [start_snakemake(dirs["unbroken"], "--cores", "1", *TRAINED, **options)]
    try:
        with ThreadPoolExecutor(2) as pool:
            stopped = [
                pool.submit(interrupt, dirs[how], how, processes, **options)
                for how in ("cancelled", "requeued")
            ]
            for future in stopped:
                future.result()
        finish(processes[0], dirs["unbroken"])
    finally:
        stop(processes)
    return dirs


@pytest.mark.parametrize("how", ["cancelled", "requeued"])
def test_a_training_job_stopped_by_slurm_resumes_and_ends_as_an_unbroken_run(preempted, how):
    from safetensors.numpy import load_file

    workdir, unbroken_dir = preempted[how], preempted["unbroken"]
    log = (workdir / "results/logs/train/lm.log").read_text()
    assert "resuming lm from its checkpoint" in log, log[-3000:]
    pd.testing.assert_frame_equal(
        pd.read_parquet(workdir / TRAINED[0]), pd.read_parquet(unbroken_dir / TRAINED[0])
    )
    ours, unbroken = (
        load_file(d / TRAINED[1] / "model.safetensors") for d in (workdir, unbroken_dir)
    )
    assert ours.keys() == unbroken.keys()
    for name in ours:
        assert (ours[name] == unbroken[name]).all(), name
