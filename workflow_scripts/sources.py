"""Source strings (``scheme:rest``) of models and datasets, and what data a dataset holds."""

from __future__ import annotations

# what the rows of each built-in dataset hold
BUILTIN_KINDS = {"pairs": "pairs", "corpus": "text", "shapes": "image"}
# the head a model needs to be scored on each kind of dataset by ablation
ABLATION_HEADS = {
    "pairs": "sequence_classification",
    "image": "image_classification",
    "text": "causal_lm",
}


def source_scheme(source: str) -> tuple[str, str]:
    """``"hf:gpt2@main"`` -> ``("hf", "gpt2@main")``."""
    scheme, _, rest = source.partition(":")
    return scheme, rest


def dataset_kind(spec: dict) -> str:
    """pairs, text or image: given by the source where it can, else by the ``kind`` key."""
    scheme, rest = source_scheme(spec["source"])
    if scheme == "builtin":
        return BUILTIN_KINDS[rest]
    if scheme == "imagefolder":
        return "image"
    return spec["kind"]
