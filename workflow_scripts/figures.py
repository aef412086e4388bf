"""figures: the study's figures from the statistics, ablation and training Parquet files.

Each figure kind is an entry of ``workflow_scripts.figure_registry`` (what it reads, its caption)
and a drawing function here, ``draw(data, title)``. A group figure is drawn for a group of
models named in the config, a training figure once over the training runs; each is written as
PNG and PDF. The kinds of the study:
  outliers   percentage of features with outliers per layer (the study's Figure 5)
  kurtosis   mean kurtosis per layer, the rotated kurtosis beside it, the Gaussian 3 marked (Fig. 6)
  regimes    kurtosis per layer of every model of the group in one panel: training regimes side
             by side (Fig. 8)
  ablation   accuracy against block for tail and head ablation, one panel per dataset (Figs. 4, 7)
  dynamics   kurtosis (standard and rotated) of every read-out point against the training step,
             one panel per run and dataset: when and where the basis appears
  training   loss curves of training runs
The x axis counts read-out points (blocks); a dotted vertical line marks each place where the
stage changes between consecutive read-out points (a ResNet's stages); error bars are the
statistics' standard errors. The runs of a run with seeds (``regime``: the run, for each of its
models) are drawn as one line, their mean per read-out point, in a band of one standard
deviation across seeds. Colours: the Okabe-Ito palette, safe for colour-blind readers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from workflow_scripts.figure_registry import FIGURES, Figure
from workflow_scripts.plotting import MARKERS, PALETTE, _pyplot, _style, save
from workflow_scripts.stage import InputError


class FigureError(InputError):
    """A figure that cannot be drawn from what it was given."""


def read_frames(paths: list[str], what: str, group: str) -> pd.DataFrame:
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FigureError(f"group {group!r}: no {what} at {', '.join(missing)}")
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)


def blocks_applied(frame: pd.DataFrame) -> pd.Series:
    """The x axis: blocks that produced each read-out (transformers: read-out 0 is the embedding,
    stage 0; ResNets: read-out 0 is the first block's output, stages from 1)."""
    return frame["layer"] + (frame["stage"] > 0).astype(int)


def stage_boundaries(frame: pd.DataFrame) -> list[float]:
    """Where the stage changes between consecutive read-out points: halfway between the two
    points' x positions (the read-out points of a layer as its first row has them)."""
    points = frame.drop_duplicates("layer").sort_values("layer")
    x = blocks_applied(points).to_numpy()
    changes = points["stage"].to_numpy()[1:] != points["stage"].to_numpy()[:-1]
    return [(a + b) / 2 for a, b, change in zip(x[:-1], x[1:], changes) if change]


def _axes_style(axis, frame: pd.DataFrame, title: str, ylabel: str) -> None:
    """Integer ticks, the labels, a legend below the panel, and dotted vertical lines where the
    stage changes."""
    from matplotlib.ticker import MaxNLocator

    for x in stage_boundaries(frame):
        axis.axvline(x, color="0.6", linestyle=":", linewidth=1)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set(title=title, xlabel="blocks applied", ylabel=ylabel)
    labels = axis.get_legend_handles_labels()[1]
    columns = 1 if max(map(len, labels), default=0) > 28 else 2  # long labels: one column
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=columns)


def _panels(plt, count: int, width: float = 4.4, height: float = 4.0):
    figure, axes = plt.subplots(
        1, count, figsize=(width * count, height), squeeze=False, layout="constrained"
    )
    return figure, axes[0]


def regimes_of(frame: pd.DataFrame) -> pd.Series:
    """What each row is drawn under: its ``regime`` (a run with seeds) where it has one, else its
    model."""
    if "regime" not in frame:
        return frame["model"]
    return frame["regime"].fillna(frame["model"])


def seed_mean(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of one or several models (the seeds of a run) as one per read-out point: the mean
    value, and ``seed_spread``, the standard deviation across the models (NaN for one)."""
    keys = ["layer", "stage"]
    grouped = rows.groupby(keys, sort=True)["value"]
    points = grouped.mean().rename("value").to_frame()
    points["seed_spread"] = grouped.std(ddof=1)
    points["seeds"] = grouped.count()
    if "spread" in rows:
        points["spread"] = rows.groupby(keys, sort=True)["spread"].mean()
    return points.reset_index()


def _line(axis, rows: pd.DataFrame, label: str, i: int, linestyle="-", scale=1.0, errors=True):
    """One model's rows as a line (with its standard errors as error bars), or the seeds of a
    run as their mean in a band of one standard deviation across seeds."""
    colour = PALETTE[i % len(PALETTE)]
    seeds = rows["model"].nunique()
    points = seed_mean(rows) if seeds > 1 else rows.sort_values("layer")
    x, y = blocks_applied(points), points["value"] * scale
    if seeds > 1:
        band = points["seed_spread"].fillna(0) * scale
        axis.fill_between(x, y - band, y + band, color=colour, alpha=0.2, linewidth=0)
        label = f"{label} (mean of {seeds} seeds, ±1 sd)"
    spread = (
        points["spread"].fillna(0) * scale if errors and seeds == 1 and "spread" in points else None
    )
    axis.errorbar(
        x,
        y,
        yerr=spread,
        label=label,
        color=colour,
        marker=MARKERS[i % len(MARKERS)],
        markersize=3.5,
        linewidth=1.3,
        linestyle=linestyle,
        capsize=2,
    )


def _series(
    axis,
    frame: pd.DataFrame,
    metric: str,
    setting: str | None,
    label: str,
    i: int,
    linestyle="-",
    scale=1.0,
):
    rows = frame[frame["metric"] == metric]
    if setting is not None:
        rows = rows[rows["setting"] == setting]
    _line(axis, rows, label, i, linestyle, scale)


def _per_dataset(frame: pd.DataFrame, title: str, draw_panel):
    """One panel per dataset, each drawn by ``draw_panel(axis, rows, heading)``."""
    plt = _pyplot()
    _style(plt)
    datasets = sorted(frame["dataset"].unique())
    figure, axes = _panels(plt, len(datasets))
    for axis, dataset in zip(axes, datasets):
        draw_panel(axis, frame[frame["dataset"] == dataset], f"{title}: {dataset}")
    return figure


def kurtosis(stats: pd.DataFrame, title: str, rotated: bool = True):
    """Kurtosis per read-out point; with ``rotated``, the rotated kurtosis dashed beside it."""
    from matplotlib.ticker import FuncFormatter

    def panel(axis, part, heading):
        regime = regimes_of(part)
        for i, model in enumerate(regime.unique()):
            rows = part[regime == model]
            _series(axis, rows, "kurtosis", None, model, i)
            if rotated:
                _series(
                    axis, rows, "rotated_kurtosis", None, f"{model}, rotated", i, linestyle="--"
                )
        axis.axhline(3, color="0.3", linewidth=1, linestyle="-.", label="Gaussian (3)")
        if rotated:
            axis.set_yscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            axis.yaxis.set_major_formatter(plain)
            axis.yaxis.set_minor_formatter(plain)
        _axes_style(
            axis,
            part,
            heading,
            "mean kurtosis (dashed: rotated)" if rotated else "mean kurtosis (standard basis)",
        )

    return _per_dataset(stats, title, panel)


def regimes(stats: pd.DataFrame, title: str):
    """Every model's kurtosis in one panel: training regimes side by side."""
    return kurtosis(stats, title, rotated=False)


def outliers(stats: pd.DataFrame, title: str):
    def panel(axis, part, heading):
        part = part[part["metric"] == "outlier_fraction"]
        signed = part[part["setting"].str.startswith("signed")]
        signed = signed.assign(regime=regimes_of(signed))
        for i, ((model, setting), rows) in enumerate(
            signed.groupby(["regime", "setting"], sort=False)
        ):
            _series(axis, rows, "outlier_fraction", setting, f"{model} ({setting})", i, scale=100)
        _axes_style(axis, part, heading, "features with outliers (%)")

    return _per_dataset(stats, title, panel)


def ablation(results: pd.DataFrame, title: str):
    def panel(axis, part, heading):
        part = part[part["metric"] == "top1"]
        regime = regimes_of(part)
        for i, model in enumerate(regime.unique()):
            rows = part[regime == model]
            for direction, style in (("tail", "-"), ("head", "--")):
                line = rows[rows["direction"] == direction]
                _line(axis, line, f"{model}, {direction}", i, style, 100, errors=False)
        axis.set_ylim(0, 100)
        _axes_style(axis, part, f"{heading} (solid: tail, dashed: head)", "top-1 accuracy (%)")

    return _per_dataset(results, title, panel)


def dynamics(stats: pd.DataFrame, title: str):
    """Kurtosis (solid) and rotated kurtosis (dashed) against the training step (``step``), one
    line per read-out point coloured from the first to the last, one panel per run (its
    ``regime``: the mean of its seeds) and dataset."""
    from matplotlib import colormaps
    from matplotlib.ticker import FuncFormatter

    if "step" not in stats or stats["step"].isna().all():
        raise FigureError(f"group {title!r}: the dynamics figure needs each model's step")
    plt = _pyplot()
    _style(plt)
    stats = stats.assign(regime=regimes_of(stats).str.replace(r"@\d+$", "", regex=True))
    panels = list(stats.groupby(["regime", "dataset"], sort=True))
    figure, axes = _panels(plt, len(panels), width=4.8)
    colours = colormaps["viridis"]
    layers = sorted(stats["layer"].unique())
    for axis, ((run, dataset), part) in zip(axes, panels):
        for metric, style in (("kurtosis", "-"), ("rotated_kurtosis", "--")):
            rows = part[part["metric"] == metric]
            means = rows.groupby(["layer", "step"], sort=True)["value"].mean().reset_index()
            for layer, line in means.groupby("layer"):
                colour = colours(layers.index(layer) / max(1, len(layers) - 1))
                label = f"read-out {layer}" if metric == "kurtosis" else None
                axis.plot(
                    line["step"],
                    line["value"],
                    style,
                    color=colour,
                    label=label,
                    marker="o",
                    markersize=2.5,
                    linewidth=1.2,
                )
        axis.axhline(3, color="0.3", linewidth=1, linestyle="-.", label="Gaussian (3)")
        axis.set_xscale("log")
        axis.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # texts are not parsed as math
        axis.xaxis.set_major_formatter(plain)
        axis.yaxis.set_major_formatter(plain)
        axis.yaxis.set_minor_formatter(plain)
        seeds = part["model"].str.replace(r"@\d+$", "", regex=True).nunique()
        heading = f"{run} on {dataset}" + (f" (mean of {seeds} seeds)" if seeds > 1 else "")
        axis.set(title=heading, xlabel="training step", ylabel="mean kurtosis (dashed: rotated)")
        axis.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    return figure


def training(metrics: dict[str, pd.DataFrame], title: str):
    plt = _pyplot()
    _style(plt)
    figure, (loss_axis, accuracy_axis) = _panels(plt, 2)
    for i, (run, frame) in enumerate(metrics.items()):
        colour = PALETTE[i % len(PALETTE)]
        smooth = frame["loss"].rolling(10, min_periods=1).mean()
        loss_axis.plot(frame["step"], smooth, color=colour, label=run, linewidth=1.3)
        evaluated = frame.dropna(subset=["eval_accuracy"])
        accuracy_axis.plot(
            evaluated["step"],
            100 * evaluated["eval_accuracy"],
            color=colour,
            marker=MARKERS[i % len(MARKERS)],
            markersize=3.5,
            label=run,
        )
    loss_axis.set(title=f"{title}: training loss (mean of 10 steps)", xlabel="step", ylabel="loss")
    accuracy_axis.set(
        title=f"{title}: held-out accuracy", xlabel="step", ylabel="accuracy (%)", ylim=(0, 100)
    )
    loss_axis.legend(fontsize=7)
    return figure


def read_inputs(figure: Figure, paths: list[str], group: str):
    """What a figure draws from: one long-form DataFrame of its statistics or ablation files, or
    {run: metrics DataFrame} of its training runs' files (results/train/<run>/metrics.parquet)."""
    if figure.inputs == "training":
        return {Path(p).parent.name: pd.read_parquet(p) for p in paths}
    what = "ablation results" if figure.inputs == "ablation" else "statistics"
    return read_frames(paths, what, group)


def draw_figure(
    kind: str,
    group: str,
    inputs: list[str],
    outputs: list[str],
    dpi: int = 150,
    regimes: dict | None = None,
    steps: dict | None = None,
) -> None:
    """Draw figure ``kind`` (its registry entry's drawing function, defined in this module) for
    ``group`` from its input files, and write it to ``outputs``; ``regimes``: {model: the run
    with seeds it is one seed of}, drawn together; ``steps``: {model: the training step it is
    the model of} (snapshots)."""
    figure = FIGURES[kind]
    data = read_inputs(figure, inputs, group)
    if regimes and isinstance(data, pd.DataFrame):
        data = data.assign(regime=data["model"].map(regimes))
    if steps and isinstance(data, pd.DataFrame):
        data = data.assign(step=data["model"].map(steps))
    drawing = globals()[figure.draw](data, group)
    save(drawing, outputs, dpi)


def run(
    figure: str,
    group: str,
    data: list[str],
    png: str,
    pdf: str,
    dpi: int = 150,
    regimes: dict | None = None,
    steps: dict | None = None,
) -> None:
    """The figure stages: figure kind ``figure`` of ``group`` from its input files ``data``
    (``regimes``, ``steps``: see :func:`draw_figure`)."""
    draw_figure(figure, group, data, [png, pdf], dpi, regimes, steps)
    print(f"wrote {png}, {pdf}", file=sys.stderr)
