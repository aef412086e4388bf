"""profiles/slurm on a real SLURM: scripts/slurm-localhost.sh installs and starts a single-node
SLURM on this machine (Debian, root, apt), the tiny test config (tests/configs/tiny.yaml) runs
through it with the profile, and gives the same statistics and ablation results as a local run;
a second checkout sharing the first's output cache computes nothing, whether the first ran
locally or through SLURM and the second runs through SLURM or locally; a training job cancelled
(scancel) or requeued (scontrol requeue) midway resumes and ends as an unbroken run.

Fails, not skips, where SLURM cannot be installed or started: CI runs this on a fresh machine."""

from __future__ import annotations

import json
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

from workflow_scripts import output_cache, rehearsal

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
GPU_RULES = {"extract", "ablate", "train"}  # the rules ask for the GPUs their model needs
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
# scheduled with --gpus=N as on a cluster (roberta-tiny's N is its config's `gpus: 2`), find no
# CUDA device and run on the CPU.


def start_snakemake(
    workdir, *args, timeout: int, config: dict = TINY_CONFIG, cache: Path | None = None
) -> subprocess.Popen:
    """Snakemake in workdir, under `timeout -k` (SIGTERM alone does not stop it while jobs run),
    its output in workdir/snakemake.out; its output cache in ``cache``, else in the working
    directory."""
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
    env = {k: v for k, v in environment().items() if k != output_cache.VARIABLE}
    if cache is not None:
        env[output_cache.VARIABLE] = str(cache)
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
    the same time (the SLURM run leaves the CPUs idle while it polls), each with a cache folder
    of its own. Then, again at the same time, second checkouts, each sharing one of those
    folders: through SLURM after the local run, and locally after the SLURM run (a second run in
    the same mode is test_cache's)."""
    names = ("slurm", "local", "slurm-after-local", "local-after-slurm")
    dirs = {name: tmp_path_factory.mktemp(name) for name in names}
    caches = {name: tmp_path_factory.mktemp(f"cache-{name}") for name in ("slurm", "local")}
    processes = []
    outputs, seconds = {}, {}

    def run(name, cache, local=False):
        start = time.monotonic()
        if local:
            processes.append(start_snakemake(dirs[name], "--cores", "2", timeout=600, cache=cache))
        else:
            processes.append(through_slurm(dirs[name], timeout=600, cache=cache))
        return processes[-1], start

    try:
        local, local_start = run("local", caches["local"], local=True)
        first, start = run("slurm", caches["slurm"])
        outputs["slurm"] = finish(first, dirs["slurm"])
        seconds["slurm"] = time.monotonic() - start
        outputs["local"] = finish(local, dirs["local"])
        seconds["local"] = time.monotonic() - local_start
        second = {
            "slurm-after-local": run("slurm-after-local", caches["local"]),
            "local-after-slurm": run("local-after-slurm", caches["slurm"], local=True),
        }
        for name, (process, start) in second.items():
            outputs[name] = finish(process, dirs[name])
            seconds[name] = time.monotonic() - start
    finally:
        stop(processes)
    for name in names:
        logs = list((dirs[name] / "results/logs").rglob("*.log"))
        computed = [log for log in logs if output_cache.HIT not in log.read_text()]
        print(
            f"{name}: {seconds[name]:.0f} s, {len(logs)} jobs, {len(computed)} computed, "
            f"{len(logs) - len(computed)} from the cache"
        )
    return SimpleNamespace(
        dirs=dirs,
        outputs=outputs,
        slurm_dir=dirs["slurm"],
        slurm_output=outputs["slurm"],
        local_dir=dirs["local"],
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
    jobs = submitted_logs(runs.slurm_output)
    known = slurm_jobs()
    assert set(jobs) <= set(known), "SLURM does not know some of the job ids Snakemake reported"
    assert len({known[jobid]["JobName"] for jobid in jobs}) == 1  # the plugin names them by run
    gpus = {}
    for jobid, (rule, log) in jobs.items():
        job = known[jobid]
        assert job["JobState"] == "COMPLETED", (rule, job["JobState"])
        assert job["NumCPUs"] == "1", (rule, job)  # cpus_per_task: threads, capped by --max-threads
        asked = re.search(r"gpu:(\d+)", job.get("TresPerJob", ""))
        assert (asked is not None) == (rule in GPU_RULES), (rule, job)
        if asked:  # the log's folder names the job's wildcards
            gpus[rule, "roberta-tiny" in log] = int(asked.group(1))
    assert gpus[("extract", True)] == gpus[("ablate", True)] == 2, gpus
    assert gpus[("extract", False)] == 1, gpus


def test_slurm_and_local_runs_give_the_same_results(runs):
    for path in RESULTS:
        pd.testing.assert_frame_equal(
            pd.read_parquet(runs.slurm_dir / path), pd.read_parquet(runs.local_dir / path), obj=path
        )


@pytest.mark.parametrize("second", ["slurm-after-local", "local-after-slurm"])
def test_a_second_checkout_sharing_the_cache_computes_nothing(runs, second):
    """Local and SLURM jobs compute the same keys: whichever ran first, the second run takes every
    result from the cache (each job's log says so) and gives the same numbers."""
    first = runs.dirs["local" if second.endswith("local") else "slurm"]
    logs = sorted((runs.dirs[second] / "results/logs").rglob("*.log"))
    assert len(logs) == len(list((first / "results/logs").rglob("*.log")))
    for log in logs:
        text = log.read_text()
        assert output_cache.HIT in text and output_cache.STORED not in text, (log, text[-2000:])
    computed = list((first / "results/logs/extract").rglob("*.log"))
    assert computed and all(output_cache.STORED in log.read_text() for log in computed)
    if second.startswith("slurm"):
        assert sorted(submitted(runs.outputs[second]).values()) == sorted(
            submitted(runs.slurm_output).values()
        )
    for path in RESULTS:
        pd.testing.assert_frame_equal(
            pd.read_parquet(runs.dirs[second] / path), pd.read_parquet(first / path), obj=path
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


STUDY = REPO / "configs/study.yaml"
# the study's MNLI fine-tunes scored by ablation (its settings), and the statistics of one of its
# own gptr2-nano checkpoints
STUDY_TARGETS = [
    "results/figures/ablation-mnli-ablation.png",
    "results/stats/gptr2-nano-with-momentum-with-weight-decay/mnli-matched.parquet",
]


def test_the_study_rehearses_through_slurm(slurm, tmp_path):
    """configs/study.yaml's dress rehearsal (docs/rehearsal.md) through profiles/slurm: the
    stand-ins resolve in the SLURM jobs as in a local run (each job reads the rehearsal from the
    config, offline), every job but the local rules is a SLURM job, and the figures are drawn.
    A figure group and a model's statistics (21 jobs): the whole rehearsal is `make
    rehearsal`'s."""
    folder = tmp_path / "stand-ins"
    laid = subprocess.run(
        [sys.executable, "-m", "workflow_scripts.rehearsal", str(STUDY), str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment(),
    )
    assert laid.returncode == 0, laid.stderr[-3000:]
    command = ["timeout", "-k", "10", "900", sys.executable, "-m", "snakemake"]
    command += ["--snakefile", str(REPO / "Snakefile"), "--configfile", str(STUDY)]
    command += ["--config", f"rehearsal={folder}", "--profile", str(REPO / "profiles/slurm")]
    command += [*SLURM_OVERRIDES, *STUDY_TARGETS]
    env = {k: v for k, v in environment().items() if k != output_cache.VARIABLE}
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    jobs = submitted(output)
    assert sorted(set(jobs.values())) == [
        "ablate",
        "extract",
        "figure_ablation",
        "layer_stats",
        "merge_stats",
        "prepare_data",
    ]
    for target in STUDY_TARGETS:
        assert (folder / "run" / target).is_file(), target
    manifests = list((folder / "run/results/models").glob("*/manifest.json"))
    assert len(manifests) == 5
    for path in manifests:  # each hub model the stand-in, pinned to its commit
        manifest = json.loads(path.read_text())
        assert manifest["revision"] == rehearsal.commit_of(manifest["source"][3:]), manifest
