"""Model families and their adapters.

Each family lives in one module (its record's ``module`` in ``workflow_scripts.families``) with
the same four functions:

- ``init(spec, tokenizer=None) -> (model, tokenizer)``: a random-initialised model; a text
  family uses ``tokenizer``, else its built-in one; a ResNet has no tokenizer (None);
- ``load(directory, family, head=None, num_labels=None, dtype=None) -> (model, tokenizer)``: a
  stored model, under ``head`` (with ``num_labels`` classes) instead of its stored one where
  given, in ``dtype`` (``workflow_scripts.models.precision``: float32 where None); a family
  whose models can be split over devices also takes ``placement`` (accelerate's device map:
  ``workflow_scripts.models.placement``; it is passed only where a config splits a model);
- ``write(model, tokenizer, directory)``: the stored layout (weights, config.json, the
  tokenizer's files);
- ``adapter(model, tokenizer, family, final_readout)``: the model wrapped for extraction and
  ablation.

A ResNet's config.json travels with it as the dict ``model.config``. The modules are imported by
name, so a stage runs (and its rule declares as code) only the family it needs.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from workflow_scripts import families
from workflow_scripts.atomic import written
from workflow_scripts.models.adapter import Adapter, Readout
from workflow_scripts.models.store import read_manifest, write_manifest
from workflow_scripts.options.placement import Placement


def family_module(family: str):
    """The module of a model family."""
    return importlib.import_module(families.get(family).module)


def load_model(directory: str | Path, family: str, **options):
    """The model stored in ``directory`` and its tokenizer (``options``: head, num_labels)."""
    return family_module(family).load(directory, family, **options)


def load_adapter(
    directory: str | Path,
    final_readout: str = "raw",
    dtype: str | None = None,
    placement: Placement | None = None,
) -> tuple[Adapter, dict]:
    """The adapter of the model stored in ``directory`` (checked against its manifest), in
    ``dtype`` (float32 where None), split over devices where ``placement`` says (else whole on
    the CPU: ``Adapter.place`` moves it), and the manifest."""
    manifest = read_manifest(directory)
    family = manifest["family"]
    module = family_module(family)
    split = {"placement": placement} if placement is not None and placement.split else {}
    model, tokenizer = module.load(directory, family, dtype=dtype, **split)
    return module.adapter(model, tokenizer, family, final_readout), manifest


def write_model_files(model, tokenizer, family: str, directory: str | Path) -> None:
    """Weights and config (and, for text models, the tokenizer) in the stored layout."""
    family_module(family).write(model, tokenizer, directory)


def save_model(model, tokenizer, family: str, directory: str | Path, **fields) -> dict:
    """Write a model directory atomically, with its manifest (``fields`` plus the family, the
    parameter count and the files' digests); returns the manifest."""
    with written(directory, directory=True) as tmp:
        write_model_files(model, tokenizer, family, tmp)
        return write_manifest(
            tmp,
            family=family,
            revision=None,
            parameters=sum(p.numel() for p in model.parameters()),
            **fields,
        )


__all__ = [
    "Adapter",
    "Readout",
    "family_module",
    "load_adapter",
    "load_model",
    "save_model",
    "write_model_files",
]
