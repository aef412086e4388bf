"""The options of the feature_page stage."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FeaturePageOptions:
    """A feature page (the same entry: ``page_examples``, ``page_thumbnail``)."""

    layer: int
    features: list[int]  # named on the page
    examples: int  # top examples per feature
    thumbnail: int  # pixels of an image thumbnail's longer side
    outlying: int  # outlying features listed
    output_weights: int  # outputs shown per feature where a head has more
    include_padding: bool
    max_tokens: int
