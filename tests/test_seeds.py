"""Runs with several seeds: one run per seed named as a grid axis would name it, the analyses and
figure groups that name the run naming every seed, figures showing the seeds' mean in a band of
one standard deviation, and the tables keeping each run's seed."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import yaml
from support import REPO
from test_figures import stats_fixture

from workflow_scripts import figures
from workflow_scripts.config import ConfigError, checked
from workflow_scripts.plan import resolve
from workflow_scripts.report_tables import write_csv


@pytest.fixture
def config() -> dict:
    """The default config with its optimizer grid run on two seeds."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["training"]["runs"]["gptr2-nano"]["seeds"] = [3, 7]
    for spec in config["figures"]["top_examples"]:
        if spec["model"].startswith("gptr2-nano-"):
            spec["model"] += "-s3"
    return config


def test_a_run_with_seeds_is_one_run_per_seed_named_after_the_grid(config):
    study = resolve(config)
    names = [f"gptr2-nano-{o}-s{s}" for o in ("sgd", "adam") for s in (3, 7)]
    assert [r for r in study.runs if r.startswith("gptr2-nano")] == names
    for name in names:
        run = study.runs[name]
        assert run.settings["seed"] == int(name[-1]) and "seeds" not in run.settings
        assert run.replicate_of == name[:-3]
        assert name in study.models and study.models[name].run == name
    assert study.runs["resnet-rms-sgd"].replicate_of is None
    # the analyses, the ablation and the figure group that named a run now name its seeds
    assert {m for m, d in study.statistics if d == "corpus"} >= set(names)
    assert {m for m, d in study.ablations if d == "corpus"} >= set(names)
    group = study.figure_groups["small-lms"]
    assert set(names) <= set(group.models)
    assert dict(group.regimes) == {name: name[:-3] for name in names}
    assert "gptr2-init" not in group.regimes


def test_a_figure_naming_one_model_must_name_one_seed(config):
    checked(config)
    config["figures"]["top_examples"][1]["model"] = "gptr2-nano-sgd"
    with pytest.raises(ConfigError, match="one run per seed; name one of them: gptr2-nano-sgd-s3"):
        checked(config)


@pytest.mark.parametrize("seeds", [[], [1, 1], [-1]])
def test_seeds_must_be_distinct_and_not_negative(config, seeds):
    config["training"]["runs"]["gptr2-nano"]["seeds"] = seeds
    with pytest.raises(ConfigError, match="seeds"):
        checked(copy.deepcopy(config))


def seeded_stats() -> tuple[pd.DataFrame, dict]:
    """Statistics of three seeds of run ``lm`` (their kurtosis apart by seed) and one other
    model, with the regimes the figure stage is given."""
    frames = []
    for i, model in enumerate(["lm-s0", "lm-s1", "lm-s2", "init"]):
        frame = stats_fixture(model, [0, 0, 0, 0])
        kurtosis = frame["metric"] == "kurtosis"
        frame.loc[kurtosis, "value"] = frame.loc[kurtosis, "value"] * (1 + i) ** 2
        frames.append(frame)
    return pd.concat(frames, ignore_index=True), {f"lm-s{s}": "lm" for s in range(3)}


def test_figures_draw_the_mean_of_the_seeds_in_a_band_of_one_standard_deviation():
    stats, regimes = seeded_stats()
    drawing = figures.regimes(stats.assign(regime=stats["model"].map(regimes)), "g")
    axis = drawing.axes[0]
    # each drawn series: its legend label and its line (an errorbar container's data line)
    lines = {c.get_label(): c.lines[0] for c in axis.containers}
    seeded = next(label for label in lines if label.startswith("lm "))
    assert "mean of 3 seeds" in seeded and "init" in lines
    assert not any(label.startswith("lm-s") for label in lines)  # one line, not one per seed
    kurtosis = stats[(stats["metric"] == "kurtosis") & stats["model"].str.startswith("lm-")]
    values = kurtosis.pivot(index="layer", columns="model", values="value").to_numpy()
    np.testing.assert_allclose(np.asarray(lines[seeded].get_ydata(), float), values.mean(axis=1))
    bands = [
        c
        for c in axis.collections
        if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")
    ]
    assert len(bands) == 1
    vertices = bands[0].get_paths()[0].vertices
    spread = values.std(axis=1, ddof=1)
    assert np.isclose(vertices[:, 1].max(), (values.mean(axis=1) + spread).max())
    assert np.isclose(vertices[:, 1].min(), (values.mean(axis=1) - spread).min())
    figures._pyplot().close(drawing)


def test_the_figure_stage_draws_seeds_together(tmp_path):
    stats, regimes = seeded_stats()
    paths = []
    for model, frame in stats.groupby("model"):
        paths.append(str(tmp_path / f"{model}.parquet"))
        frame.to_parquet(paths[-1])
    for kind in ("kurtosis", "outliers", "regimes"):
        figures.run(
            kind,
            "g",
            paths,
            str(tmp_path / f"{kind}.png"),
            str(tmp_path / "f.pdf"),
            regimes=regimes,
        )
        assert (tmp_path / f"{kind}.png").stat().st_size > 1000


def test_the_tables_keep_each_runs_seed(tmp_path):
    stats, _ = seeded_stats()
    paths = []
    for model, frame in stats.groupby("model"):
        paths.append(str(tmp_path / f"{model}.parquet"))
        frame.to_parquet(paths[-1])
    write_csv(paths, tmp_path / "table.csv", {"lm-s0": 0, "lm-s1": 1, "lm-s2": 2})
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table.columns[:2]) == ["model", "seed"]
    seeds = table.groupby("model")["seed"].first()
    assert seeds["lm-s2"] == 2 and seeds["lm-s0"] == 0 and np.isnan(seeds["init"])
