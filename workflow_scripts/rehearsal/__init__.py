"""A dress rehearsal of a config: every source it names laid out offline as a tiny stand-in
under its real name, and the config shrunk to match, so that the whole workflow runs to its last
figure in minutes on a CPU and a config error shows up here, not hours into a cluster run.

    python -m workflow_scripts.rehearsal configs/study.yaml .rehearsal/study    # the stand-ins
    snakemake --configfile configs/study.yaml --config rehearsal=.rehearsal/study --cores all

The stand-ins, in the folder given (:func:`lay_out`):

- ``hub/``: a Hugging Face hub cache holding, for every ``hf:`` model, a random-initialised
  checkpoint of the same architecture (``model_type`` from ``configs/hub_models.yaml``, where
  every id a shipped config names is recorded), head and tokenizer kind (the tokenizer class
  transformers maps the ``model_type`` to, with its special tokens, over a byte-level
  vocabulary), with :data:`BLOCKS` blocks of width :data:`WIDTH`; the study's gptr2-nano
  checkpoints in their own form (the author's class, pickled weights, 0-d norm gains);
- ``datasets/``: Hugging Face ``datasets``' cache holding each ``hf:`` dataset's splits, with the
  columns and label names the record gives, filled from the built-in sets;
- ``torch/``: ``TORCH_HOME``, with torchvision's weight files for every ``torchvision:`` model,
  random-initialised (the real architecture);
- ``images/``: an image folder (ImageNet's layout, one folder per class) for every
  ``imagefolder:`` path.

``--config rehearsal=<folder>`` (:func:`staged`) then runs the config on them: offline
(``HF_HUB_OFFLINE``), in ``<folder>/run`` with an output cache of its own (a stand-in is keyed
like the real model it stands in for, so it must never share a cache with real runs), with its
rows, steps, shards and sizes shrunk (:func:`shrink`). Everything else (names, families,
heads, figure groups, analyses, the study's settings) is the config's own."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import yaml

from workflow_scripts import output_cache
from workflow_scripts.sources import Source, dataset_kind

HUB_RECORD = Path(__file__).resolve().parents[2] / "configs" / "hub_models.yaml"
BLOCKS = 2  # blocks of every hub stand-in
WIDTH = 32  # and its width
ROWS = 8  # rows of each dataset a rehearsal reads (its stand-ins hold twice as many)
IMAGE_ROWS = 4  # and of an image set (a ResNet's ablation runs it through ~100 variants)
STEPS = 4  # steps of each training run
MAX_TOKENS = 32
IMAGE_CLASSES = 1000  # class folders of a stand-in image folder (ImageNet's count)


class RehearsalError(ValueError):
    """A config a rehearsal cannot stand in for, naming the source."""


def hub_record(path: Path = HUB_RECORD) -> dict:
    """``configs/hub_models.yaml``: what each hub id a shipped config names is, and where that
    was read."""
    return yaml.safe_load(path.read_text())


def commit_of(repo: str) -> str:
    """The stand-in's commit: a hash of its id, never a real revision of it."""
    return hashlib.sha1(f"rehearsal stand-in of {repo}".encode()).hexdigest()


# --- the config, shrunk ---------------------------------------------------------------------


def shrink(config: dict, folder: Path) -> dict:
    """``config`` as a rehearsal runs it on the stand-ins in ``folder``: hub models at the
    stand-ins' size, every dataset at :data:`ROWS` rows (:data:`IMAGE_ROWS` of images) in one
    shard (image folders moved into ``folder``), training runs of :data:`STEPS` steps at a small
    size with two seeds and one snapshot at most, small batches and sequences, and the
    top-examples layers scaled to the stand-ins' blocks."""
    config = copy.deepcopy(config)
    scale = {}
    for name, spec in config["models"].items():
        source = Source.parse(spec["source"])
        if source.scheme == "hf":
            spec["source"] = str(unpinned(source))
            scale[name] = BLOCKS / spec.get("blocks", BLOCKS)
            spec.update(blocks=BLOCKS, width=WIDTH)
            for key in ("gpus", "max_memory"):  # sized for the real model
                spec.pop(key, None)
    for spec in config["datasets"].values():
        source = Source.parse(spec["source"])
        if source.scheme == "imagefolder":
            spec["source"] = f"imagefolder:{image_folder(folder, source.location)}"
        rows = IMAGE_ROWS if dataset_kind(spec) == "image" else ROWS
        spec["rows"] = min(spec.get("rows") or rows, rows)
        spec["shards"] = 1
        spec.pop("expected_rows", None)
    for run in config.get("training", {}).get("runs", {}).values():
        _shrink_run(run)
    for section, batch in (("extract", 4), ("ablation", 4)):
        settings = config.setdefault(section, {})
        settings["batch_size"] = min(settings.get("batch_size", batch), batch)
        settings["max_tokens"] = min(settings.get("max_tokens", MAX_TOKENS), MAX_TOKENS)
    stats = config.setdefault("stats", {})
    stats["rotations"] = min(stats.get("rotations", 1), 1)
    for entry in config.get("figures", {}).get("top_examples", []):
        entry["layer"] = round(entry["layer"] * scale.get(entry["model"], 1))
    return config


def _shrink_run(run: dict) -> None:
    run.pop("epochs", None)
    run["steps"] = STEPS
    run.update(batch_size=2, warmup_steps=1, eval_every=2, checkpoint_every=2, eval_fraction=0.25)
    for key in ("context", "max_tokens"):
        if key in run:
            run[key] = min(run[key], 16 if key == "context" else MAX_TOKENS)
    arch = run.get("arch")
    if arch and "width" in arch:  # a transformer
        arch.update(layers=BLOCKS, width=WIDTH, heads=4)
        if "context" in arch:  # as long as what extraction reads
            arch["context"] = min(arch["context"], MAX_TOKENS)
    elif arch and "widths" in arch:  # a ResNet keeps its stages and blocks, at 8 channels
        arch["widths"] = [8] * len(arch["widths"])
    if "seeds" in run:
        run["seeds"] = run["seeds"][:2]
    if "snapshots" in run:
        run["snapshots"] = [STEPS // 2]  # one, and the run's end: a dynamics figure's two points


def image_folder(folder: Path, path: str) -> Path:
    """Where the stand-in of the image folder ``path`` lies under ``folder``."""
    return Path(folder).resolve() / "images" / path.lstrip("/")


def staged(config: dict) -> tuple[dict, Path | None]:
    """The config a run uses, and the folder it runs in (None: where Snakemake was started).
    With ``rehearsal: <folder>``: the config shrunk (:func:`shrink`), run in ``<folder>/run``,
    with this process's environment (which the jobs inherit) pointed at the stand-ins and at an
    output cache of the rehearsal's own; refused where no stand-ins were laid out there."""
    if not config.get("rehearsal"):
        return config, None
    config = dict(config)
    folder = Path(config.pop("rehearsal")).resolve()
    laid_out = laid_out_in(folder)
    missing = [source for source in sources(config) if source not in laid_out]
    if missing:
        there = "no stand-ins there" if not laid_out else f"no stand-in there of {missing[0]}"
        raise RehearsalError(
            f"rehearsal={folder}: {there}; lay them out first: "
            f"python -m workflow_scripts.rehearsal <configfile> {folder}"
        )
    os.environ.update(environment(folder))
    (folder / "run").mkdir(exist_ok=True)
    return shrink(config, folder), folder / "run"


LAID_OUT = "stand-ins.json"  # written last: the sources the folder stands in for
STOOD_IN = ("hf", "torchvision", "imagefolder")  # the schemes a rehearsal stands in for


def sources(config: dict) -> list[str]:
    """Every source of ``config`` a rehearsal stands in for (a hub model's revision dropped: a
    stand-in has a commit of its own)."""
    found = set()
    for section in ("models", "datasets"):
        for spec in config[section].values():
            source = Source.parse(spec["source"])
            if source.scheme in STOOD_IN:
                found.add(str(unpinned(source) if section == "models" else source))
    return sorted(found)


def unpinned(source: Source) -> Source:
    """A hub source without its revision (``hf:<repo>``); any other source as it is."""
    if source.scheme != "hf":
        return source
    return Source("hf", source.location.partition("@")[0])


def laid_out_in(folder: Path) -> list[str]:
    """The sources whose stand-ins ``folder`` holds."""
    path = Path(folder) / LAID_OUT
    return json.loads(path.read_text()).get("sources", []) if path.is_file() else []


def environment(folder: Path) -> dict[str, str]:
    """The environment of a rehearsal's jobs: offline, on the stand-ins in ``folder``."""
    folder = Path(folder).resolve()
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_CACHE": str(folder / "hub"),
        "HF_DATASETS_CACHE": str(folder / "datasets"),
        "TORCH_HOME": str(folder / "torch"),
        output_cache.VARIABLE: str(folder / "cache"),
    }
