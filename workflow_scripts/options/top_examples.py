"""The options of the top_examples stage."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TopExamplesOptions:
    """A top-examples figure (an entry of ``figures.top_examples``, with the settings of the
    statistics and the extraction it reads)."""

    layer: int
    features: list[int]  # none: the layer's top features by max |x|, from its statistics
    top: int  # how many top features, where none are named
    examples: int  # rows shown per feature
    include_padding: bool
    max_tokens: int
    dpi: int
