"""The torch dtype a model is loaded and run in, from its name (``models.<name>.dtype``:
``workflow_scripts.options.precision``)."""

from __future__ import annotations

import torch

from workflow_scripts.options.precision import DEFAULT_MODEL_DTYPE, MODEL_DTYPES


def torch_dtype(name: str | None, stored: torch.dtype | None = None) -> torch.dtype:
    """The torch dtype of ``name`` (None: the default, float32); ``auto`` is ``stored``, the
    checkpoint's own (float32 where it says none)."""
    name = name or DEFAULT_MODEL_DTYPE
    if name not in MODEL_DTYPES:
        raise ValueError(f"model dtype {name!r}: choose one of {', '.join(MODEL_DTYPES)}")
    if name == "auto":
        return stored or torch.float32
    return getattr(torch, name)


def hf_dtype(name: str | None) -> torch.dtype | str:
    """What Hugging Face's ``from_pretrained(dtype=...)`` takes for ``name``: ``"auto"`` reads
    the checkpoint's own from its config."""
    return "auto" if name == "auto" else torch_dtype(name)
