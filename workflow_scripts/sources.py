"""Source strings (``scheme:rest``) of models and datasets, and what kind of data each holds."""
from __future__ import annotations

TEXT_FAMILIES = {"gpt2", "gptr2", "roberta", "bert"}
BUILTIN_KINDS = {"pairs": "pairs", "corpus": "text", "shapes": "image"}


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


def model_kind(spec: dict) -> str:
    """text or image: what a model of this family reads."""
    return "text" if spec["family"] in TEXT_FAMILIES else "image"
