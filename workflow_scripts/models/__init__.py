"""Model families and their adapters."""
from __future__ import annotations

from pathlib import Path

from workflow_scripts.models.adapter import Adapter, Readout
from workflow_scripts.models.store import read_manifest

FAMILIES = ("gpt2", "gptr2", "roberta", "bert", "resnet")


def load_adapter(directory: str | Path, final_readout: str = "raw") -> tuple[Adapter, dict]:
    """The adapter of the model stored in ``directory`` (checked against its manifest) and the
    manifest."""
    manifest = read_manifest(directory)
    family = manifest["family"]
    if family == "resnet":
        from workflow_scripts.models import resnet
        model, config = resnet.load(directory)
        return resnet.ResNetAdapter(model, config["preprocess"]), manifest
    if family not in FAMILIES:
        raise ValueError(f"{directory}: unknown model family {family!r}; known: {FAMILIES}")
    from workflow_scripts.models import transformers_text
    model, tokenizer = transformers_text.load(directory, family)
    return transformers_text.TextAdapter(model, tokenizer, family, final_readout), manifest


__all__ = ["Adapter", "Readout", "load_adapter", "FAMILIES"]
