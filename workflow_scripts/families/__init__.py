"""The model families: everything the workflow knows about each, one record per family.

A family is a module under ``workflow_scripts.models`` (building, storing, loading and adapting
its models; see ``workflow_scripts.models``) plus its record, a ``register(Family(...))`` call in
a module of this package named after it (``families/<name>.py``, found when the package is
imported): what it reads, its heads and the Hugging Face classes that carry them, the
``model_type`` values a hub checkpoint may have (or any decoder-only one), how a Hugging Face
model of it is configured and laid out (its config settings, where its blocks and final norm
sit, its norms), its architecture settings and their checks, its read-out points, its size and
FLOP estimate, its built-in tokenizer and its default outlier threshold (and the study's, where
that differs). Every other module asks this registry. Adding a family is one module under
``models/`` and one record here.

Each record is a module of its own so that the output cache sees a family's facts only in the
jobs of that family: the code key of a rule that runs a model covers its family's model module
and record (``Family.record``), so adding or editing a family reruns that family's jobs alone.

Imported at DAG-build time (by the Snakefile, through the config): no torch, no transformers.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from workflow_scripts.stage import InputError

VOCABULARY = 50_257  # embedding rows assumed for a transformer with a real (hub) vocabulary
DEFAULT_WIDTH = {"text": 1024, "image": 2048}  # of a hub or local model that states none


class UnknownFamilyError(InputError):
    """A family name that no record has."""


@dataclass(frozen=True)
class Architecture:
    """A named architecture a family loads by name (``torchvision:<name>``)."""

    blocks: int  # residual blocks
    width: int  # channels of the last block's output
    flops: float  # forward FLOPs per 224 x 224 image (2 x multiply-adds)
    parameters: float


@dataclass(frozen=True)
class ModelSize:
    """What the cost estimate and job resources need of a model."""

    readouts: int
    width: int
    parameters: float
    flops_per_row: float  # forward FLOPs per token (transformers) or per image (ResNets)


@dataclass(frozen=True)
class Family:
    """One model family.

    ``heads`` maps each head the family supports to the Hugging Face class that carries it
    (None where the family's module builds its own). ``arch_required`` and ``arch_optional`` are
    the ``arch`` keys of an ``init:`` model (and of a training run that builds one);
    ``check_arch(where, arch)`` returns an error message or None. ``trained_by`` lists the
    training run kinds that may build a model of the family (``causal_lm``,
    ``image_classification``) or fine-tune one (``sequence_classification``).

    A Hugging Face text family built by ``workflow_scripts.models.transformers_text`` also says
    how: ``hf_config(arch)`` gives the settings of the config of an ``init:`` model (of the model
    type ``model_types[0]``), ``hf_blocks`` and ``hf_final_norm`` where the base model keeps its
    blocks and its final norm (attribute paths; no final norm where None), and
    ``scalar_rms_norm`` that every LayerNorm becomes a ScalarRMSNorm.
    """

    name: str
    module: str
    modality: str  # what its models read: text or image
    default_head: str
    heads: Mapping[str, str | None]
    threshold: float  # default outlier threshold (the study: RoBERTa 4, GPT-2 10, ResNet 6)
    arch_required: tuple[str, ...]
    arch_optional: tuple[str, ...]
    check_arch: Callable[[str, Mapping], str | None]
    estimate: Callable[[Family, int, Mapping, int, bool], ModelSize]
    model_types: tuple[str, ...] = ()
    decoder_only: bool = False  # any Hugging Face model_type but encoder-decoder ones
    tokenizer: str | None = None  # the built-in tokenizer's style: its special tokens and pairs
    trained_by: tuple[str, ...] = ()
    embedding_readout: bool = True  # the stream is also read before the first block
    architectures: Mapping[str, Architecture] = field(default_factory=dict)
    study_threshold: float | None = None  # the study's scripts' threshold, where not ``threshold``
    hf_config: Callable[[Mapping], dict] | None = None
    hf_blocks: str | None = None
    hf_final_norm: str | None = None
    scalar_rms_norm: bool = False

    @property
    def record(self) -> str:
        """The module that holds this record."""
        return f"{__name__}.{self.name}"

    def default_threshold(self, study_compatible: bool = False) -> float:
        """The outlier threshold where the config sets none: the study's with
        ``study_compatible``."""
        if study_compatible and self.study_threshold is not None:
            return self.study_threshold
        return self.threshold

    def readouts(self, blocks: int) -> int:
        """Read-out points of a model with ``blocks`` residual blocks."""
        return blocks + 1 if self.embedding_readout else blocks

    def blocks(self, arch: Mapping) -> int:
        """Residual blocks of an architecture: ``layers`` is a count, or blocks per stage."""
        layers = arch["layers"]
        return sum(layers) if isinstance(layers, (list, tuple)) else layers

    def size(
        self,
        blocks: int,
        arch: Mapping | None = None,
        width: int | None = None,
        vocabulary: bool = False,
        architecture: str | None = None,
    ) -> ModelSize:
        """The size of a model: a named architecture's, else estimated from its blocks and its
        arch (built here) or stated width (hub, local); ``vocabulary``: it embeds a real one."""
        if architecture is not None:
            named = self.architectures[architecture]
            return ModelSize(
                self.readouts(named.blocks), named.width, named.parameters, named.flops
            )
        width = width or DEFAULT_WIDTH[self.modality]
        return self.estimate(self, blocks, arch or {}, width, vocabulary)


def not_whole(where: str, arch: Mapping) -> str | None:
    """The first architecture setting that should be a whole number (or a list of them) and is
    not: 32.0 passes a YAML number check and fails deep inside a model's constructor."""
    for key, value in arch.items():
        values = value if isinstance(value, list) else [value]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if any(not isinstance(v, int) for v in numbers):
            return f"{where}.{key}: {value!r}; needs whole numbers (write 32, not 32.0)"
    return None


def check_transformer_arch(where: str, arch: Mapping) -> str | None:
    if not isinstance(arch.get("layers"), int):
        return f"{where}.layers: {arch.get('layers')!r}; a transformer needs a number of blocks"
    if problem := not_whole(where, arch):
        return problem
    if "width" in arch and "heads" in arch and arch["width"] % arch["heads"]:
        return f"{where}.width: {arch['width']} is not divisible by heads ({arch['heads']})"
    return None


def transformer_size(family: Family, blocks: int, arch: Mapping, width: int, vocabulary: bool):
    """12 x blocks x width^2 parameters in the blocks, plus the embedding where the model has a
    real vocabulary; 2 FLOPs per parameter and token."""
    width = arch.get("width", width)
    parameters = 12 * blocks * width**2 + (VOCABULARY * width if vocabulary else 0)
    return ModelSize(family.readouts(blocks), width, parameters, 2 * parameters)


TRANSFORMER_ARCH = (("layers", "width", "heads"), ("context",))  # required, optional keys
TEXT_CLASSIFIER = "sequence_classification"


def encoder_config(arch: Mapping, *, position_offset: int, token_types: int) -> dict:
    """The Hugging Face config settings of a BERT-style encoder of ``arch``: ``position_offset``
    more position embeddings than tokens (RoBERTa numbers positions after the padding index),
    ``token_types`` segment embeddings."""
    return {
        "hidden_size": arch["width"],
        "num_hidden_layers": arch["layers"],
        "num_attention_heads": arch["heads"],
        "intermediate_size": 4 * arch["width"],
        "max_position_embeddings": arch.get("context", 128) + position_offset,
        "type_vocab_size": token_types,
    }


def text_transformer(**fields) -> Family:
    """A family of Hugging Face text transformers: what they share (modality, arch keys and
    check, size estimate), then ``fields``."""
    shared = {
        "modality": "text",
        "arch_required": TRANSFORMER_ARCH[0],
        "arch_optional": TRANSFORMER_ARCH[1],
        "check_arch": check_transformer_arch,
        "estimate": transformer_size,
    }
    return Family(**{**shared, **fields})


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the registry (a name registered twice is an error)."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    if family.default_head not in family.heads:
        raise ValueError(f"family {family.name}: default head {family.default_head!r} not in heads")
    FAMILIES[family.name] = family
    return family


def run_family(run: Mapping) -> str | None:
    """The family a training run builds from its arch: its ``family`` key, else the one family
    its kind trains (a ResNet for image_classification); None for a fine-tune (its base's)."""
    if "family" in run or run["kind"] == "sequence_classification":
        return run.get("family")
    trained = [name for name, family in FAMILIES.items() if run["kind"] in family.trained_by]
    return trained[0] if len(trained) == 1 else None


def get(name: str) -> Family:
    """The record of family ``name``; an error naming the known families otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(
            f"unknown model family {name!r}; known: {', '.join(FAMILIES)}"
        ) from None


def _discover() -> None:
    """Import every record module of this package (in name order), registering its family."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_discover()
