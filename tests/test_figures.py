"""Figures render from small Parquet fixtures; bad groups fail with a clear message."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from support import EXTRACT_OPTIONS

from workflow_scripts.config import ConfigError, validate
from workflow_scripts.figures import FigureError, blocks_applied, run, stage_boundaries


def stats_fixture(model: str, stages: list[int]) -> pd.DataFrame:
    rows = []
    for layer, stage in enumerate(stages):
        for metric, setting, value in (
            ("kurtosis", "standard basis", 3 + layer),
            ("rotated_kurtosis", "mean of 1 rotation(s)", 3.0),
            ("outlier_fraction", "signed x > 6", 0.01 * layer),
            ("outlier_fraction", "magnitude |x| > 6", 0.02 * layer),
        ):
            rows.append(
                {
                    "model": model,
                    "dataset": "shapes",
                    "layer": layer,
                    "stage": stage,
                    "block": 0,
                    "name": f"l{layer}",
                    "metric": metric,
                    "setting": setting,
                    "value": value,
                    "spread": 0.1,
                    "rows": 100,
                    "feature": None,
                }
            )
    return pd.DataFrame(rows)


def ablation_fixture(model: str, layers: int) -> pd.DataFrame:
    rows = [
        {
            "model": model,
            "dataset": "pairs",
            "layer": k,
            "stage": 0,
            "block": k,
            "name": f"l{k}",
            "direction": d,
            "blocks_ablated": 0,
            "metric": "top1",
            "value": 0.3 + 0.1 * k,
            "examples": 10,
            "predictions": 10,
        }
        for k in range(layers)
        for d in ("tail", "head")
    ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("figure", ["kurtosis", "outliers", "regimes"])
def test_statistics_figures_render(tmp_path, figure):
    paths = []
    for model in ("resnet-a", "resnet-b"):
        paths.append(tmp_path / f"{model}.parquet")
        stats_fixture(model, [1, 1, 2, 2, 3]).to_parquet(paths[-1])
    out = [tmp_path / f"{figure}.png", tmp_path / f"{figure}.pdf"]
    run(figure, "resnets", list(map(str, paths)), str(out[0]), str(out[1]))
    image = Image.open(out[0])
    assert image.size[0] > 400 and image.size[1] > 300
    assert np.asarray(image.convert("L")).std() > 10  # something is drawn
    assert out[1].read_bytes()[:5] == b"%PDF-"


def pngpdf(stem):
    return str(stem.with_suffix(".png")), str(stem.with_suffix(".pdf"))


def test_ablation_and_training_figures_render(tmp_path):
    ablation_fixture("roberta", 4).to_parquet(tmp_path / "a.parquet")
    run("ablation", "g", [str(tmp_path / "a.parquet")], *pngpdf(tmp_path / "ablation"))
    assert Image.open(tmp_path / "ablation.png").size[0] > 400
    (tmp_path / "run").mkdir()
    pd.DataFrame(
        {
            "step": range(30),
            "loss": np.linspace(3, 1, 30),
            "learning_rate": 0.1,
            "grad_norm": 1.0,
            "eval_accuracy": [np.nan] * 29 + [0.8],
        }
    ).to_parquet(tmp_path / "run" / "metrics.parquet")
    run(
        "training",
        "runs",
        [str(tmp_path / "run" / "metrics.parquet")],
        *pngpdf(tmp_path / "training"),
    )
    assert Image.open(tmp_path / "training.png").size[0] > 400


def test_resnet_x_axis_counts_blocks():
    frame = stats_fixture("r", [1, 1, 2])
    assert sorted(blocks_applied(frame).unique()) == [1, 2, 3]  # read-out 0 is after block 1
    text = stats_fixture("t", [0, 0, 0])
    assert sorted(blocks_applied(text).unique()) == [0, 1, 2]  # read-out 0 is the embedding


def test_stage_boundaries_lie_where_the_stage_changes():
    assert stage_boundaries(stats_fixture("r", [1, 1, 2, 2, 2, 3])) == [2.5, 5.5]
    assert stage_boundaries(stats_fixture("t", [0, 0, 0])) == []  # one stage: none


def test_missing_statistics_are_named(tmp_path):
    with pytest.raises(FigureError, match="group 'g': no statistics at .*nothing.parquet"):
        run("kurtosis", "g", [str(tmp_path / "nothing.parquet")], *pngpdf(tmp_path / "k"))


def test_group_naming_a_model_without_statistics(default_config):
    default_config["figures"]["groups"]["resnets"]["models"].append("gpt2-init")
    with pytest.raises(
        ConfigError,
        match="figures.groups.resnets: model 'gpt2-init' has no statistics on dataset 'shapes'",
    ):
        validate(default_config)


def test_group_ablation_figure_needs_ablation_results(default_config):
    default_config["ablation"]["analyses"] = default_config["ablation"]["analyses"][:2]
    with pytest.raises(ConfigError, match="no ablation on dataset 'shapes'.*ablation.analyses"):
        validate(default_config)


def test_top_examples_against_numpy_and_drawn(model_dirs, dataset_files, tmp_path):
    from workflow_scripts import extract as extraction
    from workflow_scripts.activations import open_shard
    from workflow_scripts.data import store
    from workflow_scripts.models import load_adapter
    from workflow_scripts.options.extract import ExtractOptions
    from workflow_scripts.plotting import save
    from workflow_scripts.top_examples import TopExamplesError, draw, top_rows

    options = ExtractOptions(
        **{
            **EXTRACT_OPTIONS,
            "dtype": "float32",
            "batch_size": 4,
            "chunk_rows": 8,
            "chunks_per_shard": 2,
        }
    )
    for family, dataset in (("resnet", "shapes"), ("gpt2", "corpus")):
        shards = []
        for shard in range(2):
            shards.append(tmp_path / f"{family}-{shard}.zarr")
            extraction.extract(
                model_dirs[family], dataset_files[dataset], shard, 2, shards[-1], options
            )
        layer = 2
        chosen = top_rows([str(s) for s in shards], layer, [0, 3], 3, include_padding=False)
        x = np.concatenate([open_shard(s)[f"layer-{layer}"][:] for s in shards])
        ids = np.concatenate([open_shard(s)["example_id"][:] for s in shards])
        pad = np.concatenate([open_shard(s)["is_padding"][:] for s in shards])
        for feature in (0, 3):
            best = {}
            for value, example in zip(x[~pad, feature], ids[~pad]):
                best[example] = max(best.get(example, -np.inf), value)
            expected = sorted(best.items(), key=lambda kv: -kv[1])[:3]
            got = [(e, v) for v, e, _ in chosen[feature]]
            assert [e for e, _ in got] == [e for e, _ in expected]
            np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6)
        adapter, _ = load_adapter(model_dirs[family])
        frame, kind, names = store.read(dataset_files[dataset])
        figure = draw(adapter, frame, kind, names, layer, chosen, 40, "test")
        save(figure, [str(tmp_path / f"{family}.png")])
        assert Image.open(tmp_path / f"{family}.png").size[0] > 600
        # a feature past the layer's width, or a read-out point the model lacks: one line
        width = x.shape[1]
        with pytest.raises(TopExamplesError, match=rf"\[{width}\] .*has {width} features"):
            top_rows([str(s) for s in shards], layer, [0, width], 3, include_padding=False)
        with pytest.raises(TopExamplesError, match="no read-out point 99; the model has"):
            top_rows([str(s) for s in shards], 99, [0], 3, include_padding=False)


def test_top_examples_need_activations(default_config):
    default_config["figures"]["top_examples"] = [
        {"model": "resnet-init", "dataset": "pairs", "layer": 1}
    ]
    with pytest.raises(ConfigError, match="no activations of dataset 'pairs'"):
        validate(default_config)
    default_config["figures"]["top_examples"] = [
        {"model": "resnet-init", "dataset": "shapes", "layer": 9}
    ]
    with pytest.raises(ConfigError, match="read-out points 0..3"):
        validate(default_config)


def test_texts_are_drawn_as_written_not_as_mathtext(tmp_path):
    """A dataset's text or a name with `$` in it is drawn literally: mathtext would fail on it
    (`$\\notacommand$`) or garble it."""
    from workflow_scripts.plotting import _pyplot, _style, save

    plt = _pyplot()
    _style(plt)
    figure, axis = plt.subplots()
    label = axis.text(0.1, 0.5, r"costs $\notacommand$ or $5")
    axis.set_title("$x^$")
    assert not label.get_parse_math()
    save(figure, [str(tmp_path / "texts.png")])
    assert (tmp_path / "texts.png").stat().st_size > 0
