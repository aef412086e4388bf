"""The output cache and reruns: real Snakemake runs of a tiny config, in a temporary folder.

Each run uses a copy of the workflow (so its code can be edited), its own working directory and
its own cache folder (RESIDUAL_STREAMS_CACHE).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from support import REPO, TINY_SPECS, WORKFLOW_FILES, environment, load_config

from workflow_scripts.fetch_model import fetch
from workflow_scripts.output_cache import HIT

pytestmark = pytest.mark.workflow

CONFIG = load_config("cache")


class Workflow:
    """A copy of the workflow, a working directory and a cache folder."""

    def __init__(self, root: Path, cache: Path | None = None):
        self.checkout, self.workdir = root / "checkout", root / "work"
        self.cache = cache or root / "cache"
        for name in WORKFLOW_FILES:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(
                    source, self.checkout / name, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                self.checkout.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, self.checkout / name)
        self.workdir.mkdir()
        self.cache.mkdir(exist_ok=True)
        self.config = None  # the config of the last run

    def changed(self) -> dict:
        """A copy of the last run's config, to change."""
        return copy.deepcopy(self.config)

    def command(self, config: dict, *args) -> list[str]:
        self.config = copy.deepcopy(config)
        (self.workdir / "config.yaml").write_text(yaml.safe_dump(config))
        return [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(self.checkout / "Snakefile"),
            "--directory",
            str(self.workdir),
            "--configfile",
            str(self.workdir / "config.yaml"),
            "--cores",
            "2",
            "--rerun-incomplete",
            *args,
        ]

    def environment(self) -> dict:
        """The jobs run the copy's code, and store in and take from this cache folder."""
        return environment(RESIDUAL_STREAMS_CACHE=str(self.cache), PYTHONPATH=str(self.checkout))

    def run(self, config: dict, *args) -> list[tuple[str, dict]]:
        """Run to the end; the jobs it scheduled, as (rule, wildcards)."""
        result = self.attempt(config, *args)
        assert result.returncode == 0, result.stderr[-4000:]
        return scheduled_jobs(result.stderr)

    def attempt(self, config: dict, *args) -> subprocess.CompletedProcess:
        """Run, whatever the outcome (``run`` asserts success)."""
        return subprocess.run(
            self.command(config, *args),
            capture_output=True,
            text=True,
            timeout=600,
            env=self.environment(),
            cwd=self.workdir,
        )

    def result(self, path: str) -> Path:
        return self.workdir / "results" / path


def scheduled_jobs(log: str) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job in a Snakemake log, but the target rule `all`."""
    jobs = []
    for match in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n)*)", log, re.M):
        if match.group(1) == "all":
            continue
        wildcards = re.search(r"^    wildcards: (.*)$", match.group(2), re.M)
        pairs = [item.split("=", 1) for item in wildcards.group(1).split(", ")] if wildcards else []
        jobs.append((match.group(1), dict(pairs)))
    return jobs


def ran(log: Path) -> bool:
    """Whether the job of this log computed its results (one taken from the cache says so)."""
    return log.exists() and HIT not in log.read_text()


def rules_of(jobs) -> set[str]:
    return {rule for rule, _ in jobs}


def models_of(jobs) -> set[str]:
    return {w["model"] for _, w in jobs if "model" in w}


def cache_entry(path: Path) -> Path:
    """The cache entry folder a result links into (the result is a link to one of its items)."""
    assert path.is_symlink(), path
    return path.resolve().parent


# the jobs of one model from its extraction on, in the test config
FROM_EXTRACTION = {"extract", "layer_stats", "merge_stats", "figure_kurtosis", "table_statistics"}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """One workflow, run once to the end; the tests below change it one step at a time."""
    flow = Workflow(tmp_path_factory.mktemp("cache"))
    jobs = flow.run(CONFIG)
    assert {"fetch_model", "extract", "layer_stats", "figure_kurtosis"} <= rules_of(jobs)
    return flow


def test_outputs_live_in_the_cache_and_nothing_reruns(workflow):
    for path in (
        "models/gpt2-tiny",
        "activations/gpt2-tiny/pairs/shard-0.zarr",
        "stats/gpt2-tiny/pairs.parquet",
        "figures/kurtosis-encoders.png",
    ):
        assert workflow.cache in cache_entry(workflow.result(path)).parents
    assert workflow.run(CONFIG) == []


def test_a_plotting_option_reruns_only_figures(workflow):
    config = workflow.changed()
    config["figures"]["dpi"] = 60
    assert rules_of(workflow.run(config)) == {"figure_kurtosis"}


def test_a_threshold_reruns_only_that_models_statistics_and_figures(workflow):
    config = workflow.changed()
    config["models"]["gpt2-tiny"]["thresholds"] = [2.5]
    jobs = workflow.run(config)
    assert rules_of(jobs) == {"layer_stats", "merge_stats", "figure_kurtosis", "table_statistics"}
    assert models_of(jobs) == {"gpt2-tiny"}


def test_an_extraction_option_or_a_source_reruns_that_model_from_extraction_on(workflow, tmp_path):
    config = workflow.changed()
    config["models"]["gpt2-tiny"]["extract"] = {"max_tokens": 24}
    jobs = workflow.run(config)
    assert rules_of(jobs) == FROM_EXTRACTION
    assert models_of(jobs) == {"gpt2-tiny"}

    other = fetch({**TINY_SPECS["gpt2"], "seed": 7}, tmp_path / "gpt2-seed7")
    assert other["family"] == "gpt2"
    config["models"]["gpt2-tiny"].update(
        source=f"local:{tmp_path / 'gpt2-seed7'}", blocks=TINY_SPECS["gpt2"]["arch"]["layers"]
    )
    del config["models"]["gpt2-tiny"]["arch"], config["models"]["gpt2-tiny"]["seed"]
    jobs = workflow.run(config)
    assert rules_of(jobs) == {
        "fetch_model",
        "extract",
        "layer_stats",
        "merge_stats",
        "figure_kurtosis",
        "table_statistics",
    }
    assert models_of(jobs) == {"gpt2-tiny"}


def test_a_models_dtype_reruns_that_model_from_extraction_on_not_its_fetch(workflow):
    config = workflow.changed()
    config["models"]["gpt2-tiny"]["dtype"] = "bfloat16"
    jobs = workflow.run(config)
    assert rules_of(jobs) == FROM_EXTRACTION
    assert models_of(jobs) == {"gpt2-tiny"}
    shard = workflow.result("activations/gpt2-tiny/pairs/shard-0.zarr")
    assert json.loads((shard / "zarr.json").read_text())["attributes"]["model_dtype"] == "bfloat16"


def test_code_edits_rerun_the_stages_that_run_that_code(workflow):
    config = workflow.changed()
    before = cache_entry(workflow.result("activations/gpt2-tiny/pairs/shard-0.zarr"))
    store = workflow.checkout / "workflow_scripts/activations.py"
    original = store.read_text()
    # a comment or a docstring changes no result: nothing reruns
    assert original.startswith('"""')
    store.write_text('"""An edited docstring.\n' + original[3:] + "\n\n# an edited comment\n")
    (workflow.checkout / "workflow_scripts/output_cache.py").write_text(
        (workflow.checkout / "workflow_scripts/output_cache.py").read_text()
        + "\n_PLUMBING_EDIT = 1  # the cache's own helpers are no stage's code\n"
    )
    assert workflow.run(config) == []

    with open(workflow.checkout / "workflow_scripts/figures.py", "a") as handle:
        handle.write("\n_EDITED = 1  # an edit to the plotting code\n")
    jobs = workflow.run(config)
    assert rules_of(jobs) == {"figure_kurtosis"}

    with open(store, "a") as handle:
        handle.write("\n_EDITED = 1  # an edit to the activation store\n")
    jobs = workflow.run(config)
    assert {"extract", "layer_stats"} <= rules_of(jobs)
    assert "fetch_model" not in rules_of(jobs)
    after = cache_entry(workflow.result("activations/gpt2-tiny/pairs/shard-0.zarr"))
    assert after != before  # extracted anew, not a stale cache hit
    assert (workflow.result("logs/extract/gpt2-tiny/pairs/shard-0.log")).stat().st_size > 0


def test_renaming_a_model_is_a_cache_hit_for_fetch_and_extraction(workflow):
    def renamed(value):
        if isinstance(value, dict):
            return {renamed(k): renamed(v) for k, v in value.items()}
        if isinstance(value, list):
            return [renamed(v) for v in value]
        return "gpt2-renamed" if value == "gpt2-tiny" else value

    config = workflow.changed()
    model = cache_entry(workflow.result("models/gpt2-tiny"))
    shard = cache_entry(workflow.result("activations/gpt2-tiny/pairs/shard-0.zarr"))
    jobs = workflow.run(renamed(config))
    assert {"fetch_model", "extract"} <= rules_of(jobs)
    assert cache_entry(workflow.result("models/gpt2-renamed")) == model
    assert cache_entry(workflow.result("activations/gpt2-renamed/pairs/shard-0.zarr")) == shard
    # taken from the cache: the jobs never ran, so their logs are empty
    assert not ran(workflow.result("logs/extract/gpt2-renamed/pairs/shard-0.log"))
    assert not ran(workflow.result("logs/fetch_model/gpt2-renamed.log"))


def test_a_warm_cache_brings_back_deleted_results_without_running_jobs(workflow):
    statistics = pd.read_parquet(workflow.result("stats/roberta-tiny/pairs.parquet"))
    shutil.rmtree(workflow.workdir / "results")
    jobs = workflow.run(workflow.changed())
    assert rules_of(jobs) >= {"fetch_model", "extract", "layer_stats"}
    logs = list((workflow.workdir / "results/logs").rglob("*.log"))
    assert logs and not any(ran(log) for log in logs)  # every job came from the cache
    pd.testing.assert_frame_equal(
        pd.read_parquet(workflow.result("stats/roberta-tiny/pairs.parquet")), statistics
    )


def test_deleting_a_cache_entry_recomputes_it(workflow):
    config = workflow.changed()
    gpt2 = next(name for name in config["models"] if name.startswith("gpt2"))  # maybe renamed
    data = workflow.result("data/pairs.parquet")  # a file
    shard = workflow.result(f"activations/{gpt2}/pairs/shard-0.zarr")  # a folder
    expected = {
        path: pd.read_parquet(path)
        for path in (data, workflow.result(f"stats/{gpt2}/pairs.parquet"))
    }
    entry = cache_entry(shard)
    shutil.rmtree(entry)  # by hand: this checkout's link now dangles
    # a job that reads it makes it again first (Snakemake takes the dangling link for a
    # missing input), and stores it again under the same key
    changed = copy.deepcopy(config)
    changed["models"][gpt2]["thresholds"] = [3.5]
    jobs = workflow.run(changed)
    assert ("extract", {"model": gpt2, "dataset": "pairs", "shard": "0"}) in jobs
    assert ran(workflow.result(f"logs/extract/{gpt2}/pairs/shard-0.log"))
    assert cache_entry(shard) == entry
    # parts of entries deleted by hand: a file of a model, a layer of a shard, a dataset file
    model = workflow.result(f"models/{gpt2}")
    (cache_entry(model) / "out" / "model.safetensors").unlink()
    shutil.rmtree(cache_entry(shard) / "out.zarr" / "layer-1")
    (cache_entry(data) / "out.parquet").unlink()
    pruned = subprocess.run(
        [sys.executable, "-m", "workflow_scripts.output_cache", "prune"],
        capture_output=True,
        text=True,
        env=workflow.environment(),
        cwd=workflow.workdir,
    )
    assert pruned.returncode == 0, pruned.stderr
    assert not any(p.is_symlink() for p in (model, shard, data))  # their links went
    jobs = workflow.run(config)
    for rule, wildcards in (
        ("fetch_model", {"model": gpt2}),
        ("prepare_data", {"dataset": "pairs"}),
        ("extract", {"model": gpt2, "dataset": "pairs", "shard": "0"}),
    ):
        assert (rule, wildcards) in jobs
    assert ran(workflow.result("logs/prepare_data/pairs.log"))  # computed, not linked
    assert ran(workflow.result(f"logs/extract/{gpt2}/pairs/shard-0.log"))
    assert (cache_entry(data) / "out.parquet").is_file()
    assert (cache_entry(shard) / "out.zarr" / "layer-1").is_dir()
    assert (cache_entry(model) / "out" / "model.safetensors").is_file()
    for path, frame in expected.items():  # the numbers of an unbroken run
        pd.testing.assert_frame_equal(pd.read_parquet(path), frame)


def test_a_dry_run_changes_nothing(workflow):
    """Parsing the workflow has no side effects: a dangling link in results/ (an entry deleted,
    a result of another config) stays as it is in a dry run."""
    ghost = workflow.workdir / "results/stats/ghost/pairs/layer-0.parquet"
    ghost.parent.mkdir(parents=True)
    ghost.symlink_to(workflow.cache / ("0" * 64) / "out.parquet")
    result = workflow.attempt(workflow.changed(), "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ghost.is_symlink() and not ghost.exists()
    shutil.rmtree(workflow.workdir / "results/stats/ghost")


def test_a_changed_byte_in_cached_statistics_is_refused_then_recomputed(workflow):
    """A cached file is checked against the sha256 its entry recorded by every job that reads
    it: the error names the whole entry and how to delete it, after which the rerun recomputes
    it and ends with the numbers of an unbroken run."""
    config = workflow.changed()
    gpt2 = next(name for name in config["models"] if name.startswith("gpt2"))  # maybe renamed
    merged = workflow.result(f"stats/{gpt2}/pairs.parquet")
    expected = pd.read_parquet(merged)
    entry = cache_entry(workflow.result(f"stats/{gpt2}/pairs/layer-1.parquet"))
    item = entry / "out.parquet"
    os.chmod(item, 0o644)
    corrupt(item)
    os.chmod(item, 0o444)
    merged.unlink()  # merge_stats, which reads it, runs again
    result = workflow.attempt(config, "--keep-going")
    assert result.returncode != 0
    log = workflow.result(f"logs/merge_stats/{gpt2}/pairs.log").read_text()
    assert "does not match the sha256 recorded when it was stored" in log
    assert f"python -m workflow_scripts.output_cache remove {entry}" in log
    removed = subprocess.run(
        [sys.executable, "-m", "workflow_scripts.output_cache", "remove", str(entry)],
        capture_output=True,
        text=True,
        env=workflow.environment(),
        cwd=workflow.workdir,
    )
    assert removed.returncode == 0, removed.stderr
    jobs = workflow.run(config)
    assert ("layer_stats", {"model": gpt2, "dataset": "pairs", "layer": "1"}) in jobs
    pd.testing.assert_frame_equal(pd.read_parquet(merged), expected)


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)


def test_a_corrupted_cache_entry_is_refused_with_a_clear_error(workflow):
    config = workflow.changed()
    gpt2 = next(name for name in config["models"] if name.startswith("gpt2"))  # maybe renamed
    shard = cache_entry(workflow.result(f"activations/{gpt2}/pairs/shard-0.zarr"))
    corrupt(next((shard / "out.zarr" / "layer-1").rglob("c/*/*")))
    model = cache_entry(workflow.result("models/roberta-tiny"))
    corrupt(model / "out" / "model.safetensors")
    shutil.rmtree(workflow.workdir / "results")

    # statistics computed anew (new thresholds) read the corrupted chunk: refused
    config["stats"] = {"thresholds": {"gpt2": [2.0], "roberta": [2.0]}}
    config["models"][gpt2].pop("thresholds", None)
    result = workflow.attempt(config, "--keep-going")
    assert result.returncode != 0
    log = workflow.result(f"logs/layer_stats/{gpt2}/pairs/layer-1.log").read_text()
    assert "layer-1 rows" in log and "corrupted on disk" in log and str(shard) in log
    assert not workflow.result(f"stats/{gpt2}/pairs/layer-1.parquet").exists()

    # extraction anew (another option) loads the corrupted model: refused
    config["extract"]["max_tokens"] = 28
    result = workflow.attempt(config, "--keep-going")
    assert result.returncode != 0
    log = workflow.result("logs/extract/roberta-tiny/pairs/shard-0.log").read_text()
    assert "model.safetensors does not match its sha256" in log
    assert f"from the output cache entry {model}" in log  # named, to be deleted
    assert not workflow.result("activations/roberta-tiny/pairs/shard-0.zarr").exists()


KILL_CONFIG = load_config("interrupted")


def kill_when(flow: Workflow, config: dict, started) -> None:
    """Start the workflow and SIGKILL it, jobs and all, once ``started()`` holds; then remove
    the lock that the killed Snakemake left (`snakemake --unlock`, as a user would)."""
    with open(flow.workdir / "killed.log", "w") as log:
        process = subprocess.Popen(
            flow.command(config),
            env=flow.environment(),
            cwd=flow.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while not started():
            assert process.poll() is None, (
                "the workflow ended before the moment to kill it:\n"
                + (flow.workdir / "killed.log").read_text()[-3000:]
            )
            assert time.monotonic() < deadline, "the moment to kill the workflow never came"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    flow.run(config, "--unlock")


def temporaries(folder: Path, name: str) -> bool:
    return folder.is_dir() and any(folder.glob(f".{name}.tmp-*"))


def test_jobs_killed_midway_are_redone_and_give_the_same_results(tmp_path):
    reference = Workflow(tmp_path / "reference")
    reference.run(KILL_CONFIG)

    flow = Workflow(tmp_path / "killed")
    results = flow.workdir / "results"
    # mid-training: a checkpoint exists, the model does not
    kill_when(flow, KILL_CONFIG, lambda: (results / "train/lm/checkpoint.pt").exists())
    assert not (results / "models/lm").exists()
    # mid-extraction: the shard is being written under its temporary name
    kill_when(
        flow, KILL_CONFIG, lambda: temporaries(results / "activations/lm/corpus", "shard-0.zarr")
    )
    assert not (results / "activations/lm/corpus/shard-0.zarr").exists()
    # mid-statistics: the job has started (its log is open), its output is not there
    kill_when(
        flow, KILL_CONFIG, lambda: (results / "logs/layer_stats/lm/corpus/layer-1.log").exists()
    )
    assert not (results / "stats/lm/corpus/layer-1.parquet").exists()
    flow.run(KILL_CONFIG)

    assert (flow.result("logs/train/lm.log")).read_text().count("resum") >= 1
    for path in ("stats/lm/corpus.parquet", "train/lm/metrics.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(flow.result(path)), pd.read_parquet(reference.result(path))
        )


def test_two_checkouts_storing_the_same_entries_at_once(tmp_path):
    """Both runs compute the same jobs and store them in one cache at about the same time:
    each entry is stored once, never a copy nested inside another."""
    cache = tmp_path / "cache"
    flows = [Workflow(tmp_path / name, cache) for name in ("a", "b")]
    processes = [
        subprocess.Popen(
            flow.command(CONFIG),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=flow.environment(),
            cwd=flow.workdir,
        )
        for flow in flows
    ]
    for process in processes:
        _, log = process.communicate(timeout=600)
        assert process.returncode == 0, log[-3000:]
    folders = [entry for entry in cache.iterdir() if entry.is_dir()]
    assert folders  # models and shards are folder entries
    nested = [entry for entry in folders if (entry / entry.name).exists()]
    assert not nested, nested
    a, b = (
        flow.result(f"stats/{model}/pairs.parquet") for flow in flows for model in ["roberta-tiny"]
    )
    pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
