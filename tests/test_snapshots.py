"""The basis over training: a run keeps its model at chosen steps, each a model of its own
(``<run>@<step>``) that the analyses can use, and the dynamics figure draws the kurtosis of
every read-out point against the step."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from support import REPO
from test_figures import stats_fixture

from workflow_scripts import figures
from workflow_scripts.config import ConfigError, checked, snapshot_steps
from workflow_scripts.plan import resolve
from workflow_scripts.sources import Source


@pytest.fixture
def config() -> dict:
    """The default config with its optimizer grid keeping three snapshots, and a group that
    draws their dynamics."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["training"]["runs"]["gptr2-nano"]["snapshots"] = 3
    config["figures"]["groups"]["basis-over-training"] = {
        "models": ["gptr2-nano-sgd", "gptr2-nano-adam"],
        "datasets": ["corpus"],
        "figures": ["dynamics"],
    }
    return config


def test_snapshot_steps_are_log_spaced_before_the_last_or_as_listed():
    assert snapshot_steps("r", {"snapshots": 5, "steps": 300}) == [1, 3, 10, 31, 96]
    steps = snapshot_steps("r", {"snapshots": 29, "steps": 30})
    assert steps == list(range(1, 30))  # every step before the last, none twice
    assert snapshot_steps("r", {"snapshots": [50, 10, 10], "steps": 300}) == [10, 50]
    with pytest.raises(ConfigError, match="step 300 is not before the run's last step 300"):
        snapshot_steps("r", {"snapshots": [300], "steps": 300})
    with pytest.raises(ConfigError, match="30 snapshots; a run of 30 steps has 29"):
        snapshot_steps("r", {"snapshots": 30, "steps": 30})
    with pytest.raises(ConfigError, match="needs the run's steps"):
        snapshot_steps("r", {"snapshots": 3, "epochs": 1})


def test_every_snapshot_is_a_model_and_the_dynamics_group_has_their_statistics(config):
    study = resolve(config)
    steps = list(study.runs["gptr2-nano-adam"].settings["snapshots"])
    assert steps == snapshot_steps("r", {"snapshots": 3, "steps": 300}) == [1, 7, 45]
    for step in steps:
        model = study.models[f"gptr2-nano-adam@{step}"]
        assert (model.run, model.step, str(model.source)) == (
            "gptr2-nano-adam",
            step,
            f"train:gptr2-nano-adam@{step}",
        )
        assert model.readouts == study.models["gptr2-nano-adam"].readouts
        assert (f"gptr2-nano-adam@{step}", "corpus") in study.statistics
    assert "gptr2-nano-adam@1" in study.snapshot_models()
    assert "gptr2-nano-adam@1" not in study.trained_models()
    assert "gptr2-nano-adam" in study.trained_models()
    assert study.snapshots_of("gptr2-nano-adam") == {
        "gptr2-nano-adam@1": 1,
        "gptr2-nano-adam@7": 7,
        "gptr2-nano-adam@45": 45,
        "gptr2-nano-adam": 300,
    }
    assert Source.parse("train:lm@12").run == "lm" and Source.parse("train:lm").step is None


def test_a_dynamics_figure_needs_runs_that_keep_snapshots(config):
    config["figures"]["groups"]["basis-over-training"]["models"].append("gptr2-init")
    with pytest.raises(ConfigError, match="'gptr2-init' keeps no snapshots"):
        checked(config)


def test_snapshots_of_seeds_are_each_seeds_own(config):
    config["training"]["runs"]["gptr2-nano"]["seeds"] = [0, 1]
    config["figures"]["top_examples"] = []
    study = resolve(config)
    assert "gptr2-nano-adam-s1@7" in study.models
    assert study.models["gptr2-nano-adam-s1@7"].run == "gptr2-nano-adam-s1"
    assert ("gptr2-nano-adam-s0@45", "corpus") in study.statistics


def test_the_dynamics_figure_draws_each_read_out_against_the_step(tmp_path):
    frames, steps, regimes = [], {}, {}
    for seed in (0, 1):
        for step in (1, 10, 100):
            model = f"lm-s{seed}@{step}" if step < 100 else f"lm-s{seed}"
            frame = stats_fixture(model, [0, 0, 0])
            kurtosis = frame["metric"] == "kurtosis"
            frame.loc[kurtosis, "value"] = 3 + frame.loc[kurtosis, "layer"] * step + seed
            frames.append(frame)
            steps[model], regimes[model] = step, "lm"
    stats = pd.concat(frames, ignore_index=True)
    drawing = figures.dynamics(
        stats.assign(step=stats["model"].map(steps), regime=stats["model"].map(regimes)), "g"
    )
    axis = drawing.axes[0]
    assert axis.get_title() == "lm on shapes (mean of 2 seeds)" and axis.get_xscale() == "log"
    lines = {line.get_label(): line for line in axis.get_lines()}
    layer2 = lines["read-out 2"]
    np.testing.assert_allclose(layer2.get_xdata(), [1, 10, 100])
    np.testing.assert_allclose(layer2.get_ydata(), [3 + 2 * s + 0.5 for s in (1, 10, 100)])
    assert len(axis.get_lines()) == 3 * 2 + 1  # standard and rotated per read-out, and 3
    figures._pyplot().close(drawing)
    paths = []
    for model, frame in stats.groupby("model"):
        paths.append(str(tmp_path / f"{model}.parquet"))
        frame.to_parquet(paths[-1])
    out = tmp_path / "dynamics.png"
    figures.run(
        "dynamics", "g", paths, str(out), str(tmp_path / "d.pdf"), regimes=regimes, steps=steps
    )
    assert out.stat().st_size > 1000
    with pytest.raises(figures.FigureError, match="needs each model's step"):
        figures.run("dynamics", "g", paths, str(out), str(tmp_path / "d.pdf"))
