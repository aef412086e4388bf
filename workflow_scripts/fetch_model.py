"""fetch_model: write a model directory in the stored layout from any source.

Sources: ``init:`` (random initialisation from architecture settings and a seed),
``local:<path>`` (a directory in the stored layout, or a Hugging Face ``save_pretrained`` one),
``hf:<repo>[@<revision>]`` (the revision is pinned to a commit) and ``torchvision:<arch>``
(ImageNet weights). The directory is assembled under a temporary name and moved into place only
when complete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from workflow_scripts import families
from workflow_scripts.atomic import written
from workflow_scripts.models import family_module, load_model, write_model_files
from workflow_scripts.models.placement import weights_in_files
from workflow_scripts.models.store import (
    MANIFEST,
    ModelDirError,
    read_manifest,
    verify_files,
    write_manifest,
)
from workflow_scripts.options.placement import Placement
from workflow_scripts.sources import Source

log = logging.getLogger("fetch_model")


def fetch(spec: dict, out: str | Path) -> dict:
    """Write the model that ``spec`` describes to ``out``; returns its manifest."""
    source = Source.parse(spec["source"])
    scheme, rest = source.scheme, source.location
    fetchers = {"init": _init, "local": _local, "hf": _hub, "torchvision": _torchvision}
    if scheme not in fetchers:
        raise ValueError(
            f"unknown model source scheme {scheme!r} in {spec['source']!r}; "
            f"allowed: {', '.join(s + ':' for s in fetchers)}"
        )
    with written(out, directory=True) as tmp:
        fields = fetchers[scheme](spec, rest, tmp)
        verify_files(tmp, {})
        manifest = write_manifest(
            tmp,
            source=spec["source"],
            family=spec["family"],
            parameters=count_parameters(tmp, spec["family"]),
            **fields,
        )
    log.info("wrote %s: %s parameters from %s", out, manifest["parameters"], spec["source"])
    return manifest


def count_parameters(directory: Path, family: str) -> int:
    """Parameters of the model stored in ``directory`` (tied weights once, buffers not at all),
    by loading it: a directory that does not load fails here, not in a later stage. A model that
    can be split is loaded with its weights left in their files (nothing read into memory: a 70B
    checkpoint is checked on a login node)."""
    record = families.get(family)
    in_files = record.modality == "text" and not record.scalar_rms_norm
    options = {"placement": weights_in_files(Placement(device_map="auto"))} if in_files else {}
    model, _ = load_model(directory, family, **options)
    return sum(p.numel() for p in model.parameters())


def _init(spec: dict, _rest: str, tmp: Path) -> dict:
    settings = {k: spec[k] for k in ("arch", "seed", "head", "num_labels") if k in spec}
    model, tokenizer = family_module(spec["family"]).init(spec)
    write_model_files(model, tokenizer, spec["family"], tmp)
    return {"revision": None, "init": settings}


def _local(spec: dict, path: str, tmp: Path) -> dict:
    source = Path(path)
    if not source.is_dir():
        raise ModelDirError(f"local model path {path!r} is not a directory")
    fields = {"revision": None}
    if (source / MANIFEST).exists():
        manifest = read_manifest(source)
        if manifest["family"] != spec["family"]:
            raise ModelDirError(
                f"local model {path!r} is family {manifest['family']!r}, "
                f"but the config says {spec['family']!r}"
            )
        fields = {"revision": manifest.get("revision"), "origin": manifest["source"]}
    else:
        verify_files(source, {})
        config = json.loads((source / "config.json").read_text())
        check_model_type(f"local model {path!r}", config, spec["family"])
    for item in sorted(source.iterdir()):
        if item.name == MANIFEST:
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    return fields


def check_model_type(where: str, config: dict, family: str) -> None:
    """A Hugging Face checkpoint's config (``model_type``) against the family the config names:
    one of its model types, or any decoder-only one (families without Hugging Face model types,
    the ResNets, have nothing to check)."""
    record, model_type = families.get(family), config.get("model_type")
    if record.decoder_only and config.get("is_encoder_decoder"):
        raise ModelDirError(
            f"{where} is a {model_type!r} encoder-decoder model; family {family!r} reads "
            "decoder-only models"
        )
    owner = [f.name for f in families.FAMILIES.values() if model_type in f.model_types]
    if record.decoder_only and owner:
        raise ModelDirError(
            f"{where} is a {model_type!r} model: family {owner[0]!r} reads it, not {family!r}"
        )
    expected = record.model_types
    if expected and model_type not in expected:
        raise ModelDirError(
            f"{where} is a {model_type!r} model, not family {family!r} "
            f"(model_type {' or '.join(map(repr, expected))})"
        )


# what a checkpoint is made of besides its weights: configs and the tokenizer's files
CHECKPOINT_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def download(repo: str, revision: str, weights: bool = True) -> Path:
    """The snapshot folder of ``repo`` at ``revision`` in the Hugging Face cache, named by its
    commit (offline, with ``HF_HUB_OFFLINE=1``, the cached one): configs and tokenizer files,
    and with ``weights`` the safetensors weights, else (an older checkpoint) its PyTorch ones;
    never both, nor other frameworks' files."""
    from huggingface_hub import errors, snapshot_download

    def fetch(revision: str, patterns: list[str]) -> Path:
        try:
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as error:
            raise ModelDirError(
                f"hf:{repo}@{revision}: no such repository or revision on the hub (or it is "
                f"private: log in with `hf auth login`) ({type(error).__name__})"
            ) from None
        except (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, OSError) as error:
            raise ModelDirError(
                f"hf:{repo}@{revision} cannot be downloaded ({str(error).splitlines()[0]}), and "
                "is not in the Hugging Face cache: fetch_model runs on a machine with network "
                "(a localrule: the login node), or fill the cache there first"
            ) from None
        if not re.fullmatch(r"[0-9a-f]{40}", folder.name):
            raise ModelDirError(f"hf:{repo}@{revision} resolved to {folder.name!r}, not a commit")
        return folder

    snapshot = fetch(revision, CHECKPOINT_FILES)
    if weights:  # at the commit just resolved, so the files are of one version
        snapshot = fetch(snapshot.name, [*CHECKPOINT_FILES, "*.safetensors"])
        if not any(snapshot.glob("*.safetensors")):
            snapshot = fetch(snapshot.name, [*CHECKPOINT_FILES, "pytorch_model*.bin"])
    return snapshot


def _hub(spec: dict, repo_and_revision: str, tmp: Path) -> dict:
    repo, _, revision = repo_and_revision.partition("@")
    revision = revision or "main"
    snapshot = download(repo, revision, weights=False)
    log.info("hf:%s at %s is commit %s", repo, revision, snapshot.name)
    if not (snapshot / "config.json").is_file():
        raise ModelDirError(f"hf:{repo} at {snapshot.name} has no config.json")
    config = json.loads((snapshot / "config.json").read_text())
    check_model_type(f"hf:{repo}", config, spec["family"])  # before the weights are downloaded
    snapshot = download(repo, snapshot.name)
    if _as_stored(snapshot, config, spec["family"]):
        for file in sorted(snapshot.iterdir()):  # the checkpoint's files, copied as they are
            if file.is_file():  # (the cache's links resolved; not folders such as original/)
                shutil.copyfile(file, tmp / file.name)
    else:  # converted: loaded (as stored) and written in the stored layout
        model, tokenizer = load_model(snapshot, spec["family"], dtype="auto")
        write_model_files(model, tokenizer, spec["family"], tmp)
    return {"revision": snapshot.name, "requested_revision": revision}


def _as_stored(snapshot: Path, config: dict, family: str) -> bool:
    """Whether a hub checkpoint is in the stored layout already: safetensors weights of a class
    of transformers' own, for a family that ``from_pretrained`` loads; then its files are
    copied, never loaded whole into memory. Others (the study's gptr2 checkpoints: a class of
    their author's, pickled weights, ScalarRMSNorms) are converted."""
    import transformers

    record = families.get(family)
    named = (config.get("architectures") or [""])[0]
    return (
        record.modality == "text"
        and not record.scalar_rms_norm
        and hasattr(transformers, named)
        and any(snapshot.glob("*.safetensors"))
    )


def _torchvision(spec: dict, arch: str, tmp: Path) -> dict:
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    model = torchvision.models.get_model(arch, weights=weights)
    if not hasattr(model, "layer1"):
        raise ValueError(
            f"torchvision:{arch} is not a ResNet (no layer1); "
            "only ResNet-layout architectures are supported"
        )
    transform = weights.transforms()
    resnet = family_module(spec["family"])
    model.config = {
        "family": spec["family"],
        "architecture": arch,
        "num_classes": len(weights.meta["categories"]),
        "label_names": list(weights.meta["categories"]),
        "preprocess": resnet.imagenet_preprocess(
            resize=transform.resize_size[0], crop=transform.crop_size[0]
        ),
    }
    write_model_files(model, None, spec["family"], tmp)
    return {"revision": str(weights), "url": weights.url}


def run(spec: dict, out: str) -> None:
    """The fetch_model stage: the model a config entry names, in the stored layout."""
    fetch(spec, Path(out))
