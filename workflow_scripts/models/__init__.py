"""Model families and their adapters."""
from __future__ import annotations

from pathlib import Path

import json

from workflow_scripts.atomic import written
from workflow_scripts.models.adapter import Adapter, Readout
from workflow_scripts.models.store import CONFIG, WEIGHTS, read_manifest, write_manifest

FAMILIES = ("gpt2", "gptr2", "roberta", "bert", "resnet")


def load_adapter(directory: str | Path, final_readout: str = "raw") -> tuple[Adapter, dict]:
    """The adapter of the model stored in ``directory`` (checked against its manifest) and the
    manifest."""
    manifest = read_manifest(directory)
    family = manifest["family"]
    if family == "resnet":
        from workflow_scripts.models import resnet
        model, config = resnet.load(directory)
        return resnet.ResNetAdapter(model, config["preprocess"], config.get("label_names")), manifest
    if family not in FAMILIES:
        raise ValueError(f"{directory}: unknown model family {family!r}; known: {FAMILIES}")
    from workflow_scripts.models import transformers_text
    model, tokenizer = transformers_text.load(directory, family)
    return transformers_text.TextAdapter(model, tokenizer, family, final_readout), manifest


def write_model_files(model, companion, family: str, directory: str | Path) -> None:
    """Weights and config (and, for text models, the tokenizer) in the stored layout.
    ``companion``: the tokenizer of a text model, the config.json dict of a ResNet."""
    directory = Path(directory)
    if family == "resnet":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / WEIGHTS)
        (directory / CONFIG).write_text(json.dumps(companion, indent=2, sort_keys=True) + "\n")
    else:
        model.save_pretrained(directory)
        companion.save_pretrained(directory)


def save_model(model, companion, family: str, directory: str | Path, **fields) -> dict:
    """Write a model directory atomically, with its manifest (``fields`` plus the family, the
    parameter count and the files' digests); returns the manifest."""
    with written(directory, directory=True) as tmp:
        write_model_files(model, companion, family, tmp)
        return write_manifest(tmp, family=family, revision=None,
                              parameters=sum(p.numel() for p in model.parameters()), **fields)


__all__ = ["Adapter", "Readout", "load_adapter", "save_model", "write_model_files", "FAMILIES"]
