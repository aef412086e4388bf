"""The options of the stats stage."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StatsOptions:
    """How a read-out point's statistics are computed (``stats``, without the thresholds, which
    are each model's)."""

    include_padding: bool  # count padding rows, as the study did
    average: str  # rows, or examples (each example's rows first, as the study)
    rms: str  # row_mean, or root_mean_square (as the study)
    device: str  # cpu or cuda
    rotations: int  # random rotations of the rotated kurtosis
    rotation: str  # haar (dense) or structured
    seed: int  # of the rotations
    top_features: int  # features listed by max |x|
