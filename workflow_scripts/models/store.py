"""The stored model directory: weights, config, tokenizer files and ``manifest.json``.

The manifest records where the model came from (source, pinned revision), its family, its
parameter count, and the sha256 of every other file, so a reader can refuse a directory whose
files changed or went missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from workflow_scripts import output_cache
from workflow_scripts.output_cache import provenance, sha256_file
from workflow_scripts.stage import InputError

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # a checkpoint saved in several files
PICKLED_WEIGHTS = "pytorch_model.bin"  # an older checkpoint's (read, never written here)
CONFIG = "config.json"


class ModelDirError(InputError):
    """A model directory that is missing, incomplete or altered."""


def file_digests(directory: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under ``directory`` but the manifest, by relative path."""
    return output_cache.file_digests(Path(directory), skip=(MANIFEST,))


def write_manifest(directory: str | os.PathLike, **fields) -> dict:
    """Write ``manifest.json`` with ``fields`` and the digest of every file; returns it."""
    manifest = {**fields, "files": file_digests(directory)}
    Path(directory, MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a model directory after checking the directory matches it."""
    root = Path(directory)
    if not root.is_dir():
        raise ModelDirError(f"model directory {str(root)!r} does not exist")
    if not (root / MANIFEST).is_file():
        raise ModelDirError(f"model directory {str(root)!r} has no {MANIFEST}")
    manifest = json.loads((root / MANIFEST).read_text())
    verify_files(root, manifest["files"])
    return manifest


def read_weights(directory: str | os.PathLike) -> dict:
    """The state dict stored in ``directory``: ``model.safetensors``, the files its index names,
    or (an older Hugging Face checkpoint) ``pytorch_model.bin``, unpickled as tensors only."""
    import torch
    from safetensors.torch import load_file

    root = Path(directory)
    if (root / WEIGHTS).is_file():
        return load_file(root / WEIGHTS)
    if (root / WEIGHTS_INDEX).is_file():
        files = sorted(set(json.loads((root / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        return {k: v for name in files for k, v in load_file(root / name).items()}
    if (root / PICKLED_WEIGHTS).is_file():
        return torch.load(root / PICKLED_WEIGHTS, map_location="cpu", weights_only=True)
    raise ModelDirError(f"model directory {str(root)!r} has no {WEIGHTS}")


def verify_files(directory: str | os.PathLike, expected: dict[str, str]) -> None:
    """Raise ModelDirError unless the weights (one file, or an index of several) and config
    exist and every file matches."""
    root = Path(directory)
    if not (root / CONFIG).is_file():
        raise ModelDirError(f"model directory {str(root)!r} has no {CONFIG}")
    if not (root / WEIGHTS).is_file() and not (root / WEIGHTS_INDEX).is_file():
        raise ModelDirError(f"model directory {str(root)!r} has no {WEIGHTS} (nor {WEIGHTS_INDEX})")
    for name, digest in expected.items():
        path = root / name
        if not path.is_file():
            raise ModelDirError(
                f"model directory {str(root)!r}: {name} is listed in {MANIFEST} but missing"
            )
        if sha256_file(path) != digest:
            raise ModelDirError(
                f"model directory {str(root)!r}: {name} does not match its "
                f"sha256 in {MANIFEST} (file changed or corrupted){provenance(path)}"
            )
