"""The figure registry: adding a figure is one registry entry and one drawing function.

The registry's entries are checked against what follows from them (the drawing functions, the
config's allowed kinds), and a throwaway figure is added to a
copy of the workflow, as a contributor would add one (one entry in figure_registry.py, one
function in figures.py, nothing else), which then runs through the DAG to its PNG, PDF and
report caption.
"""

from __future__ import annotations

import pytest
import yaml
from support import copy_workflow, load_config, snakemake

from workflow_scripts import figure_registry, figures
from workflow_scripts.config import ConfigError, load_schema, validate
from workflow_scripts.figure_registry import FIGURES, Figure
from workflow_scripts.rst import literal

TOY_ENTRY = '''

register(
    Figure(
        name="throwaway_rms",
        inputs="statistics",
        draw="throwaway_rms",
        caption="""\\
The throwaway figure: the stream's RMS per read-out point of group {group}
({models} on {datasets}).""",
    )
)
'''

TOY_DRAWING = '''

def throwaway_rms(stats: pd.DataFrame, title: str):
    """The throwaway figure: the stream's RMS per read-out point."""

    def panel(axis, part, heading):
        part = part[part["metric"] == "rms"]
        for i, ((model, setting), rows) in enumerate(
            part.groupby(["model", "setting"], sort=False)
        ):
            _series(axis, rows, "rms", setting, f"{model} ({setting})", i)
        _axes_style(axis, part, heading, "RMS")

    return _per_dataset(stats, title, panel)
'''


def toy_figure(**changes) -> Figure:
    fields = {"name": "toy", "inputs": "statistics", "draw": "kurtosis", "caption": "{group}"}
    return Figure(**{**fields, **changes})


def test_the_registry_holds_the_studys_figures():
    study = {
        "outliers": ("statistics", "figure_outliers"),
        "kurtosis": ("statistics", "figure_kurtosis"),
        "regimes": ("statistics", "figure_regimes"),
        "ablation": ("ablation", "figure_ablation"),
        "training": ("training", "figure_training"),
    }
    assert {name: (FIGURES[name].inputs, FIGURES[name].rule) for name in study} == study
    assert figure_registry.group_figures()[:4] == ["outliers", "kurtosis", "regimes", "ablation"]
    assert "training" in figure_registry.training_figures()


def test_every_entry_has_its_drawing_function():
    for figure in FIGURES.values():
        assert callable(getattr(figures, figure.draw, None)), figure.name


def test_a_caption_is_filled_in():
    caption = FIGURES["outliers"].caption_with(
        {
            "group": "resnets",
            "models": "a, b",
            "datasets": "shapes",
            "thresholds": {"a": [6.0]},
            "padding": "excluded",
            "rotations": 1,
            "seed": 0,
        }
    )
    assert "for the models of group resnets." in caption
    # the fields as written, escaped for reStructuredText (the report renders them as given)
    assert f"Thresholds per model: {literal(str({'a': [6.0]}))}. Padding rows excluded." in caption
    from docutils.core import publish_parts

    html = publish_parts(caption, writer_name="html")["body"]
    assert "Thresholds per model: {'a': [6.0]}. Padding rows excluded." in html.replace(
        "&#x27;", "'"
    )


def test_the_registry_refuses_bad_entries(monkeypatch):
    monkeypatch.setattr(figure_registry, "FIGURES", dict(FIGURES))
    with pytest.raises(ValueError, match="registered twice"):
        figure_registry.register(toy_figure(name="kurtosis"))
    with pytest.raises(ValueError, match="lower case"):
        figure_registry.register(toy_figure(name="toy-figure"))
    with pytest.raises(ValueError, match="inputs 'activations'"):
        figure_registry.register(toy_figure(inputs="activations"))
    with pytest.raises(ValueError, match="caption names 'runs'"):
        figure_registry.register(toy_figure(caption="of {runs}"))
    with pytest.raises(ValueError, match="caption names 'group'"):
        figure_registry.register(toy_figure(inputs="training", caption="of {group}"))


def test_the_schema_default_is_registered():
    groups = load_schema()["definitions"]["figures"]["properties"]["groups"]
    default = groups["additionalProperties"]["properties"]["figures"]["default"]
    assert set(default) <= set(figure_registry.group_figures())


def test_the_config_takes_the_registered_group_figures(default_config, monkeypatch):
    group = default_config["figures"]["groups"]["resnets"]
    group["figures"] = ["kurtosis", "toy"]
    with pytest.raises(
        ConfigError,
        match=r"figures\.groups\.resnets\.figures\.1: 'toy' is not allowed; allowed values: "
        "outliers, kurtosis, regimes, ablation",
    ):
        validate(default_config)
    group["figures"] = ["training"]  # drawn over the training runs, not for a group
    with pytest.raises(ConfigError, match="'training' is not allowed"):
        validate(default_config)
    monkeypatch.setitem(FIGURES, "toy", toy_figure())
    group["figures"] = ["kurtosis", "toy"]
    validate(default_config)


@pytest.mark.workflow
def test_a_new_figure_is_one_entry_and_one_drawing_function(tmp_path):
    checkout, workdir = tmp_path / "checkout", tmp_path / "work"
    copy_workflow(checkout)
    # the two changes a contributor makes
    with open(checkout / "workflow_scripts/figure_registry.py", "a") as handle:
        handle.write(TOY_ENTRY)
    module = checkout / "workflow_scripts/figures.py"
    before, after = module.read_text().split("\n\ndef read_inputs(")  # beside the other drawings
    module.write_text(f"{before}{TOY_DRAWING}\n\ndef read_inputs({after}")

    config = load_config("tiny")
    config["figures"]["groups"]["resnets"]["figures"] = ["kurtosis", "throwaway_rms"]
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    targets = [
        "results/figures/throwaway_rms-resnets.png",
        "results/figures/throwaway_rms-resnets.pdf",
    ]
    # its jobs run the copy's package
    result = snakemake(
        workdir, *targets, snakefile=checkout / "Snakefile", PYTHONPATH=str(checkout)
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rule figure_throwaway_rms:" in result.stdout + result.stderr
    assert (workdir / targets[0]).read_bytes()[:4] == b"\x89PNG"
    assert (workdir / targets[1]).read_bytes()[:5] == b"%PDF-"

    report = snakemake(
        workdir, "--report", "report.html", targets[0], snakefile=checkout / "Snakefile",
        PYTHONPATH=str(checkout),
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-4000:]
    html = (workdir / "report.html").read_text(errors="replace")
    assert "throwaway_rms-resnets.png" in html
    assert "RMS per read-out point of group resnets" in html  # its caption, filled in


def test_config_text_in_the_report_is_shown_as_written():
    """A source, a name or a path from the config is text in the report, never a link,
    reference or emphasis (reStructuredText, rendered by docutils as Snakemake's report does)."""
    from docutils.core import publish_parts

    from workflow_scripts.rst import literal

    hostile = "parquet:https://evil.example/x.parquet, model_ `click <https://evil.example>`_ *x*"
    html = publish_parts(literal(hostile), writer_name="html")["body"]
    assert "<a " not in html and "<em>" not in html
    text = html.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
    assert hostile in text
