"""A model split over devices by Hugging Face accelerate (``models.<name>.device_map``): what
``from_pretrained`` is given, and the families that cannot be split.

Weights that fit no device are offloaded to a folder under the job's temporary directory (the
cluster's node-local ``$TMPDIR``), removed when the job ends.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile

import torch

from workflow_scripts.options.placement import Placement
from workflow_scripts.stage import InputError

_offload: list[str] = []  # this process's offload folder, made on first use


def offload_folder() -> str:
    """A folder of this process's for offloaded weights, removed at exit."""
    if not _offload:
        _offload.append(tempfile.mkdtemp(prefix="residual-streams-offload-"))
        atexit.register(shutil.rmtree, _offload[0], ignore_errors=True)
    return _offload[0]


def _device(name):
    """A device as accelerate takes it: a GPU's index as an int (JSON made it a string)."""
    return int(name) if isinstance(name, str) and name.isdigit() else name


def from_pretrained_options(placement: Placement | None) -> dict:
    """``device_map``, ``max_memory`` and ``offload_folder`` for ``from_pretrained`` (none
    where the model is not split)."""
    if placement is None or not placement.split:
        return {}
    device_map = placement.device_map
    if isinstance(device_map, dict):
        device_map = {module: _device(device) for module, device in device_map.items()}
    options = {"device_map": device_map, "offload_folder": offload_folder()}
    if placement.max_memory:
        options["max_memory"] = {_device(k): v for k, v in placement.max_memory.items()}
    return options


def refuse_split(placement: Placement | None, family: str) -> None:
    """Stop where a family that cannot be split is asked to be."""
    if placement is not None and placement.split:
        raise InputError(
            f"family {family!r} cannot be split over devices (device_map); its models are "
            "loaded whole: remove device_map from the model's config entry"
        )


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its weights, or for a model split by accelerate
    (``hf_device_map``), its main device (the first GPU it uses, else the CPU), where its
    offloaded blocks run too."""
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return next(model.parameters()).device
    gpus = [d for d in placed.values() if str(d) not in ("cpu", "disk")]
    if not gpus:
        return torch.device("cpu")
    return torch.device("cuda", gpus[0]) if isinstance(gpus[0], int) else torch.device(gpus[0])


def weights_in_files(placement: Placement | None) -> Placement | None:
    """What a stage that reads a split model's tokenizer and unembedding, and runs no forward
    pass, loads it with: every weight left in its file (accelerate's disk offload reads
    safetensors in place), so it needs neither the model's host memory nor a GPU; a model that
    is not split loads whole (None)."""
    return Placement(device_map={"": "disk"}) if placement is not None and placement.split else None
