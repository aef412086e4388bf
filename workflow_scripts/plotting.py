"""What every drawn figure shares: matplotlib off screen, one style (every text drawn
literally), the Okabe-Ito palette (safe for colour-blind readers), and atomic writing of PNG and
PDF. Its own module, so that an edit to one kind of figure is not the code of another."""

from __future__ import annotations

from pathlib import Path

from workflow_scripts.atomic import written

PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(plt):
    plt.rcParams.update(
        {
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "legend.frameon": False,
            # texts, labels and names drawn as written: a `$` in a dataset's text is no
            # mathtext
            "text.parse_math": False,
        }
    )


def save(figure, outputs: list[str], dpi: int = 150) -> None:
    """Write the figure to every path (the format from the suffix), atomically."""
    plt = _pyplot()
    try:
        for path in outputs:
            with written(path) as tmp:
                figure.savefig(tmp, format=Path(path).suffix.lstrip("."), dpi=dpi)
    finally:
        plt.close(figure)
