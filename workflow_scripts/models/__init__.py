"""Model families and their adapters.

Each family lives in one module (``sources.FAMILY_MODULES``) with the same four functions:
``init(spec) -> (model, companion)`` builds a random-initialised model, ``load(directory,
family) -> (model, companion)`` reads a stored one, ``write(model, companion, directory)``
stores one, and ``adapter(model, companion, family, final_readout)`` wraps one for extraction
and ablation. The companion is a text model's tokenizer, a ResNet's config.json. The modules are
imported by name, so a stage runs (and its rule declares as code) only the family it needs.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from workflow_scripts.atomic import written
from workflow_scripts.models.adapter import Adapter, Readout
from workflow_scripts.models.store import read_manifest, write_manifest
from workflow_scripts.sources import FAMILY_MODULES

FAMILIES = tuple(FAMILY_MODULES)


def family_module(family: str):
    """The module of a model family."""
    if family not in FAMILY_MODULES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILY_MODULES[family])


def load_model(directory: str | Path, family: str, **options):
    """The model stored in ``directory`` and its companion."""
    return family_module(family).load(directory, family, **options)


def load_adapter(directory: str | Path, final_readout: str = "raw") -> tuple[Adapter, dict]:
    """The adapter of the model stored in ``directory`` (checked against its manifest) and the
    manifest."""
    manifest = read_manifest(directory)
    module = family_module(manifest["family"])
    model, companion = module.load(directory, manifest["family"])
    return module.adapter(model, companion, manifest["family"], final_readout), manifest


def write_model_files(model, companion, family: str, directory: str | Path) -> None:
    """Weights and config (and, for text models, the tokenizer) in the stored layout."""
    family_module(family).write(model, companion, directory)


def save_model(model, companion, family: str, directory: str | Path, **fields) -> dict:
    """Write a model directory atomically, with its manifest (``fields`` plus the family, the
    parameter count and the files' digests); returns the manifest."""
    with written(directory, directory=True) as tmp:
        write_model_files(model, companion, family, tmp)
        return write_manifest(tmp, family=family, revision=None,
                              parameters=sum(p.numel() for p in model.parameters()), **fields)


__all__ = ["Adapter", "Readout", "family_module", "load_adapter", "load_model", "save_model",
           "write_model_files", "FAMILIES"]
