"""The options of the stages, typed: what a stage's ``run`` receives as ``options``.

The plan (``plan.resolve``) builds them from the checked config, whose schema
(``config.schema.yaml``) gives every option its default, so a name the code and the config do
not agree on fails where the plan is built, not in a job. A rule passes them to its job as JSON
(``plan.as_json``), and the stage layer builds them again from it.

Imported by the Snakefile at DAG-build time: no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
    """How a model's stream is extracted and stored (``extract``, a model's own over them)."""

    dtype: str  # storage dtype of the stream: float16, bfloat16 or float32
    batch_size: int
    max_tokens: int  # per-example token cap (truncation)
    padding: str  # longest, or max_length (pad every example to max_tokens)
    rows_per_example: int | None  # a seeded sample of each example's real tokens, or all rows
    device: str  # auto, cpu or cuda
    autocast: str | None  # float16 or bfloat16 autocast on CUDA
    chunk_rows: int  # rows per Zarr chunk
    chunks_per_shard: int  # chunks per Zarr shard file
    compression: str
    gpt2_final_readout: str  # raw, or ln_f (the study's hidden_states[-1])
    seed: int  # of the row sample


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


@dataclasses.dataclass(frozen=True)
class AblationOptions:
    """How a model is scored under head and tail ablation (``ablation``, without analyses)."""

    batch_size: int
    max_tokens: int
    padding: str
    device: str
    autocast: str | None
    final_norm: bool  # tail ablation: the stream passes the final norm before the head
    shortcut_relu: bool  # ResNets: an ablated block passes relu(shortcut(x))


def options(kind, settings: Mapping, where: str):
    """``kind`` built from ``settings``; a key it does not have, or one it lacks, is a
    ValueError naming ``where`` (the config section)."""
    names = {field.name for field in dataclasses.fields(kind)}
    unknown, missing = set(settings) - names, names - set(settings)
    if unknown or missing:
        problems = [f"unknown {', '.join(sorted(unknown))}"] if unknown else []
        problems += [f"missing {', '.join(sorted(missing))}"] if missing else []
        raise ValueError(f"{where}: {'; '.join(problems)}")
    return kind(**settings)


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
