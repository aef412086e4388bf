"""The figure kinds: everything the workflow knows about each figure it draws, one entry each.

An entry names the figure kind, what it reads, the function of ``workflow_scripts.figures`` that
draws it and its report caption. From the entries follow
the rules (``rules/figures.smk``: one rule ``figure_<name>`` per entry), the kinds a config may
list under ``figures.groups.<group>.figures`` (``workflow_scripts.config``), the report's captions
(``report/figure.rst`` shows each job's caption) and the kinds the figures stage draws
(``workflow_scripts.figures.run``). Every figure's job goes through the output cache, as every
job does. Adding a figure is one entry here and one drawing function in ``figures.py``.

Imported by the Snakefile at DAG-build time: no matplotlib, no pandas, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workflow_scripts.rst import literal

# What a figure reads: the results of every (model, dataset) of its group, or of every training
# run. A group figure is drawn once per group that lists it (results/figures/<name>-<group>.png);
# a training figure once per config, when figures.training is on and the config has training
# runs (results/figures/<name>.png).
INPUTS = {
    "statistics": "results/stats/<model>/<dataset>.parquet of the group's models and datasets",
    "ablation": "results/ablation/<model>/<dataset>.parquet of the group's models and datasets",
    "training": "results/train/<run>/metrics.parquet of every training run",
    "snapshots": "results/stats/<run>@<step>/<dataset>.parquet of every snapshot of the group's "
    "runs, and the runs' own statistics",
}

# The fields a caption may name, in ``{braces}`` (write a literal brace twice, ``{{``):
GROUP_FIELDS = {
    "group": "the group's name",
    "models": "the group's models, comma-separated",
    "datasets": "the group's datasets, comma-separated",
    "thresholds": "each model's outlier thresholds, {model: [t, ...]}",
    "padding": "'included' or 'excluded': whether padding rows were counted",
    "rotations": "the rotations of the rotated kurtosis",
    "seed": "the seed of the rotations",
}
TRAINING_FIELDS = {"runs": "the training runs, comma-separated"}

NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Figure:
    """One figure kind.

    ``name``: the kind, as a config lists it, in the file names and in the rule's name
    (``figure_<name>``); lower case, digits and underscores. ``inputs``: a key of ``INPUTS``.
    ``draw``: the name of the function in ``workflow_scripts.figures`` that draws it,
    ``draw(data, title) -> matplotlib Figure``, where ``data`` is one long-form DataFrame of
    every input (statistics, ablation) or {run: metrics DataFrame} (training) and ``title`` the
    group's name. ``caption``: the report's caption, reStructuredText with ``{fields}``
    (``GROUP_FIELDS`` or ``TRAINING_FIELDS``).
    """

    name: str
    inputs: str
    draw: str
    caption: str

    @property
    def rule(self) -> str:
        """The name of the rule that draws it."""
        return f"figure_{self.name}"

    @property
    def per_group(self) -> bool:
        """Drawn once per group that lists it (else once over the training runs)."""
        return self.inputs != "training"

    def caption_with(self, fields: dict) -> str:
        """The caption with its fields filled in, each shown as written (``rst.literal``)."""
        return self.caption.format(**{k: literal(v) for k, v in fields.items()})


FIGURES: dict[str, Figure] = {}


def register(figure: Figure) -> None:
    """Add a figure kind to the registry."""
    if not NAME.fullmatch(figure.name):
        raise ValueError(f"figure {figure.name!r}: a name is lower case, digits and underscores")
    if figure.name in FIGURES:
        raise ValueError(f"figure {figure.name!r} is registered twice")
    if figure.inputs not in INPUTS:
        raise ValueError(f"figure {figure.name!r}: inputs {figure.inputs!r}; known: {list(INPUTS)}")
    fields = GROUP_FIELDS if figure.per_group else TRAINING_FIELDS
    try:
        figure.caption_with({key: key for key in fields})
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"figure {figure.name!r}: its caption names {error}; it may name {list(fields)}"
        ) from None
    FIGURES[figure.name] = figure


def group_figures() -> list[str]:
    """The kinds a figure group may list."""
    return [name for name, figure in FIGURES.items() if figure.per_group]


def training_figures() -> list[str]:
    """The kinds drawn once over the training runs."""
    return [name for name, figure in FIGURES.items() if not figure.per_group]


register(
    Figure(
        name="outliers",
        inputs="statistics",
        draw="outliers",
        caption="""\
Percentage of features with at least one activation above the outlier threshold (signed, x > t,
as the study counted), per read-out point, for the models of group {group}.
Thresholds per model: {thresholds}. Padding rows {padding}.
Dotted vertical lines mark ResNet stage boundaries.
A run with several seeds is one line, the seeds' mean, in a band of one standard deviation
across seeds.""",
    )
)
register(
    Figure(
        name="kurtosis",
        inputs="statistics",
        draw="kurtosis",
        caption="""\
Mean Pearson kurtosis of the stream across its features per read-out point (solid) and after a
fixed random rotation (dashed, {rotations} rotation(s), seed {seed}), for group {group}, log scale.
A Gaussian has 3 (dash-dotted). Kurtosis far above 3 that falls to 3 under rotation means a
privileged basis. Error bars: standard errors over examples.
A run with several seeds is one line, the seeds' mean, in a band of one standard deviation
across seeds.""",
    )
)
register(
    Figure(
        name="regimes",
        inputs="statistics",
        draw="regimes",
        caption="""\
Mean kurtosis per read-out point (standard basis) of every model of group {group} in one panel,
to compare training regimes (optimizers, norms, trained against untrained). Error bars: standard
errors over examples.
A run with several seeds is one line, the seeds' mean, in a band of one standard deviation
across seeds.""",
    )
)
register(
    Figure(
        name="ablation",
        inputs="ablation",
        draw="ablation",
        caption="""\
Top-1 accuracy as blocks are removed, for group {group}. Tail (solid): every block after read-out
point k is ablated and the stream at k goes through the model's own final norm and head (for a
language model: the logit lens). Head (dashed): every block before k is ablated. Ablating a block
removes its residual branch and keeps its shortcut.
A run with several seeds is one line, the seeds' mean, in a band of one standard deviation
across seeds.""",
    )
)
register(
    Figure(
        name="dynamics",
        inputs="snapshots",
        draw="dynamics",
        caption="""\
Mean kurtosis of the stream (solid) and after a fixed random rotation (dashed, {rotations}
rotation(s), seed {seed}) against the training step, one line per read-out point, for the
training runs of group {group} at their snapshots and their end. Where the solid line leaves the
dashed one, the basis becomes privileged. A run with several seeds: the seeds' mean.""",
    )
)
register(
    Figure(
        name="training",
        inputs="training",
        draw="training",
        caption="""\
Training loss (mean of 10 steps) and held-out accuracy of every training run of the config:
{runs}.""",
    )
)
