"""The stage layer: one way into every stage."""

from __future__ import annotations

import dataclasses
import inspect
import types

import pytest
from support import REPO

from workflow_scripts import stage


@dataclasses.dataclass(frozen=True)
class Options:
    size: int
    name: str = "x"


def toy(
    paths: list[str],
    path: str,
    count: int,
    scale: float,
    flag: bool,
    options: Options,
    spec: dict,
    base: str | None,
    out: str,
    threads: int = 1,
):
    return locals()


def test_values_become_the_types_a_stage_declares():
    named = {
        "paths": ["a", "b"],
        "path": ["only"],
        "count": "3",
        "scale": "0.5",
        "flag": "true",
        "options": '{"size": 2}',
        "spec": '{"k": [1]}',
        "base": [],
        "out": "o",
        "code": "key",  # for the cache only: not passed
    }
    assert stage.arguments(toy, named, threads=4) == {
        "paths": ["a", "b"],
        "path": "only",
        "count": 3,
        "scale": 0.5,
        "flag": True,
        "options": Options(size=2),
        "spec": {"k": [1]},
        "base": None,
        "out": "o",
        "threads": 4,
    }


def test_a_name_the_stage_does_not_take_is_an_error():
    with pytest.raises(TypeError, match="takes no colour"):
        stage.arguments(toy, {"colour": "red"})
    with pytest.raises(TypeError, match="a list expected, got the string '0.5 2.0'"):
        stage.convert("0.5 2.0", list[float])
    with pytest.raises(TypeError, match="Options: .*unexpected keyword argument 'sise'"):
        stage.convert('{"sise": 2}', Options)


def workflow_rules(tmp_path, monkeypatch, configfile=REPO / "config.yaml"):
    """The rules of the workflow, parsed in this process (away from the checkout)."""
    monkeypatch.chdir(tmp_path)
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, ResourceSettings

    with SnakemakeApi() as api:
        workflow = api.workflow(
            snakefile=REPO / "Snakefile",
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=[configfile]),
            workdir=tmp_path,
        )._workflow
        return list(workflow.rules)


def test_every_rule_runs_its_stage_with_the_arguments_the_stage_takes(tmp_path, monkeypatch):
    """A rule's named inputs, outputs and params are its stage's arguments: none missing, none
    unknown; every rule but `all` runs the one stage script."""
    checked = set()
    for rule in workflow_rules(tmp_path, monkeypatch):
        if rule.name == "all":
            continue
        assert rule.script == "../scripts/stage.py", rule.name
        assert not rule.input._allitems() or all(name for name, _ in rule.input._allitems()), (
            f"{rule.name}: every input is named"
        )
        given = {
            name
            for items in (rule.input, rule.output, rule.params)
            for name, _ in items._allitems()
            if name
        }
        run = stage.stage_function(rule.name)
        parameters = inspect.signature(run).parameters
        required = {n for n, p in parameters.items() if p.default is inspect.Parameter.empty} - {
            "threads"
        }
        assert required <= given, (rule.name, required - given)
        assert given - set(stage.KEY_ONLY) <= set(parameters), (rule.name, given - set(parameters))
        checked.add(rule.name)
    assert {"extract", "layer_stats", "train", "fetch_model", "feature_page"} <= checked


class FakeJob(types.SimpleNamespace):
    """What a `script:` receives as `snakemake`, for one stage."""


def named(**items):
    class Named(dict):
        def items(self):
            return super().items()

    return Named(items)


def fake_job(tmp_path, rule, log=True, **params):
    return FakeJob(
        rule=rule,
        input=named(),
        output=named(out=str(tmp_path / "out.csv")),
        params=named(**params),
        wildcards=named(model="m"),
        threads=1,
        log=[str(tmp_path / "logs" / "job.log")] if log else [],
    )


def test_bad_input_ends_the_job_with_one_line_naming_it(tmp_path, monkeypatch):
    import os
    import sys

    def failing(out: str):
        raise stage.InputError("results/data/x.parquet: not a dataset")

    monkeypatch.setitem(stage.STAGES, "toy_rule", "toy.module")
    monkeypatch.setattr(stage, "stage_function", lambda rule: failing)
    saved = os.dup(sys.stderr.fileno())
    try:
        with pytest.raises(SystemExit) as exit:
            stage.run_job(fake_job(tmp_path, "toy_rule"))
    finally:
        os.dup2(saved, sys.stderr.fileno())
        os.close(saved)
    assert exit.value.code == 1
    lines = (tmp_path / "logs/job.log").read_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith("toy_rule (model=m): results/data/x.parquet: not a dataset")


def test_a_bug_leaves_its_traceback_in_the_log(tmp_path, monkeypatch):
    import os
    import sys

    def failing(out: str):
        return {}["missing"]

    monkeypatch.setattr(stage, "stage_function", lambda rule: failing)
    saved = os.dup(sys.stderr.fileno())
    try:
        with pytest.raises(SystemExit):
            stage.run_job(fake_job(tmp_path, "toy_rule"))
    finally:
        os.dup2(saved, sys.stderr.fileno())
        os.close(saved)
    text = (tmp_path / "logs/job.log").read_text()
    assert "toy_rule (model=m) failed" in text and "KeyError: 'missing'" in text


def test_a_stage_stopped_by_sigterm_leaves_no_temporary_output(tmp_path):
    """Snakemake, or SLURM preempting a job, stops it with SIGTERM: what it was writing is
    removed, not left beside the output until the job runs again."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from support import REPO, environment

    out = tmp_path / "data" / "corpus.parquet"
    spec = json.dumps({"source": "builtin:corpus", "rows": 400_000})
    process = subprocess.Popen(
        [sys.executable, "-m", "workflow_scripts.stage", "prepare_data"]
        + [f"spec={spec}", "name=corpus", f"out={out}"],
        cwd=REPO,
        env=environment(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".corpus.parquet.tmp-*")):
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the temporary output never appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode != 0
    assert not list(out.parent.iterdir())  # neither the output nor its temporary
