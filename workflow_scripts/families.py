"""The model families: everything the workflow knows about each, one record per family.

A family is a module under ``workflow_scripts.models`` (building, storing, loading and adapting
its models; see ``workflow_scripts.models``) plus its record here: what it reads, its heads and
the Hugging Face classes that carry them, the ``model_type`` values a hub checkpoint may have,
its architecture settings and their checks, its read-out points, its size and FLOP estimate, its
built-in tokenizer and its default outlier threshold. Every other module asks this registry.
Adding a family is one module and one ``register(Family(...))`` call here.

Imported at DAG-build time (by the Snakefile, through the config): no torch, no transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

VOCABULARY = 50_257  # embedding rows assumed for a transformer with a real (hub) vocabulary
DEFAULT_WIDTH = {"text": 1024, "image": 2048}  # of a hub or local model that states none


class UnknownFamilyError(ValueError):
    """A family name that no record has."""


@dataclass(frozen=True)
class Architecture:
    """A named architecture a family loads by name (``torchvision:<name>``)."""

    blocks: int  # residual blocks
    width: int  # channels of the last block's output
    flops: float  # forward FLOPs per 224 x 224 image (2 x multiply-adds)


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
    tokenizer: str | None = None  # the built-in tokenizer's style: its special tokens and pairs
    trained_by: tuple[str, ...] = ()
    embedding_readout: bool = True  # the stream is also read before the first block
    architectures: Mapping[str, Architecture] = field(default_factory=dict)

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
            return ModelSize(self.readouts(named.blocks), named.width, named.flops / 2, named.flops)
        width = width or DEFAULT_WIDTH[self.modality]
        return self.estimate(self, blocks, arch or {}, width, vocabulary)


def _transformer_arch(where: str, arch: Mapping) -> str | None:
    if not isinstance(arch.get("layers"), int):
        return f"{where}.layers: {arch.get('layers')!r}; a transformer needs a number of blocks"
    if "width" in arch and "heads" in arch and arch["width"] % arch["heads"]:
        return f"{where}.width: {arch['width']} is not divisible by heads ({arch['heads']})"
    return None


def _resnet_arch(where: str, arch: Mapping) -> str | None:
    if not isinstance(arch.get("layers"), list):
        return (
            f"{where}.layers: {arch.get('layers')!r}; a ResNet needs a list of blocks per "
            "stage, e.g. [2, 2, 2, 2]"
        )
    if len(arch.get("widths", [])) != len(arch["layers"]):
        return (
            f"{where}.widths: {arch.get('widths')!r}; needs one width per stage "
            f"({len(arch['layers'])})"
        )
    return None


def transformer_size(family: Family, blocks: int, arch: Mapping, width: int, vocabulary: bool):
    """12 x blocks x width^2 parameters in the blocks, plus the embedding where the model has a
    real vocabulary; 2 FLOPs per parameter and token."""
    width = arch.get("width", width)
    parameters = 12 * blocks * width**2 + (VOCABULARY * width if vocabulary else 0)
    return ModelSize(family.readouts(blocks), width, parameters, 2 * parameters)


def resnet_size(family: Family, blocks: int, arch: Mapping, width: int, vocabulary: bool):
    """ResNet-18 (8 basic blocks, widths 64..512) does 3.6 GFLOPs per 224 x 224 image: scaled by
    the last width squared and the depth, bottlenecks as ResNet-50 against ResNet-34, and a
    twelfth for 32 x 32 inputs without the stride-4 stem."""
    widths = arch.get("widths", [64, 128, 256, 512])
    if "widths" in arch:
        width = widths[-1] * (4 if arch.get("block") == "bottleneck" else 1)
    flops = 3.6e9 * (widths[-1] / 512) ** 2 * blocks / 8
    if arch.get("block") == "bottleneck":
        flops *= 8.2 / 7.3
    if arch.get("stem") == "cifar":
        flops /= 12
    return ModelSize(family.readouts(blocks), width, flops / 2, flops)


TRANSFORMER_ARCH = (("layers", "width", "heads"), ("context",))
TEXT_CLASSIFIER = "sequence_classification"
GPT2_HEADS = {"causal_lm": "GPT2LMHeadModel", TEXT_CLASSIFIER: "GPT2ForSequenceClassification"}
TEXT_FAMILY = dict(
    module="workflow_scripts.models.transformers_text",
    modality="text",
    arch_required=TRANSFORMER_ARCH[0],
    arch_optional=TRANSFORMER_ARCH[1],
    check_arch=_transformer_arch,
    estimate=transformer_size,
)

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


register(
    Family(
        name="gpt2",
        default_head="causal_lm",
        heads=GPT2_HEADS,
        threshold=10,
        model_types=("gpt2",),
        tokenizer="gpt2",
        trained_by=("causal_lm", TEXT_CLASSIFIER),
        **TEXT_FAMILY,
    )
)
# GPT-2 with every LayerNorm replaced by an RMSNorm with one scalar gain (the study's gptr2)
register(
    Family(
        name="gptr2",
        default_head="causal_lm",
        heads=GPT2_HEADS,
        threshold=10,
        model_types=("gpt2",),
        tokenizer="gpt2",
        trained_by=("causal_lm", TEXT_CLASSIFIER),
        **TEXT_FAMILY,
    )
)
register(
    Family(
        name="roberta",
        default_head=TEXT_CLASSIFIER,
        heads={
            "masked_lm": "RobertaForMaskedLM",
            TEXT_CLASSIFIER: "RobertaForSequenceClassification",
        },
        threshold=4,
        model_types=("roberta",),
        tokenizer="roberta",
        trained_by=(TEXT_CLASSIFIER,),
        **TEXT_FAMILY,
    )
)
register(
    Family(
        name="bert",
        default_head=TEXT_CLASSIFIER,
        heads={"masked_lm": "BertForMaskedLM", TEXT_CLASSIFIER: "BertForSequenceClassification"},
        threshold=4,
        model_types=("bert",),
        tokenizer="bert",
        trained_by=(TEXT_CLASSIFIER,),
        **TEXT_FAMILY,
    )
)
# Hugging Face decoder-only causal LMs of the Llama shape; arch.type picks an init: model's layout
register(
    Family(
        name="decoder",
        module="workflow_scripts.models.hf_decoder",
        modality="text",
        default_head="causal_lm",
        heads={"causal_lm": "AutoModelForCausalLM"},
        threshold=10,
        model_types=("llama", "qwen2", "gpt_neox", "mistral"),
        tokenizer="gpt2",
        arch_required=TRANSFORMER_ARCH[0],
        arch_optional=(*TRANSFORMER_ARCH[1], "type"),
        check_arch=_transformer_arch,
        estimate=transformer_size,
    )
)


def _torchvision(blocks_per_stage: list[int], width: int, gflops: float) -> Architecture:
    return Architecture(sum(blocks_per_stage), width, gflops * 1e9)


register(
    Family(
        name="resnet",
        module="workflow_scripts.models.resnet",
        modality="image",
        default_head="image_classification",
        heads={"image_classification": None},
        threshold=6,
        arch_required=("layers", "widths"),
        arch_optional=("block", "stem", "norm"),
        check_arch=_resnet_arch,
        estimate=resnet_size,
        trained_by=("image_classification",),
        embedding_readout=False,  # every block's output, mean-pooled over space
        architectures=MappingProxyType(
            {
                "resnet18": _torchvision([2, 2, 2, 2], 512, 3.6),
                "resnet34": _torchvision([3, 4, 6, 3], 512, 7.3),
                "resnet50": _torchvision([3, 4, 6, 3], 2048, 8.2),
                "resnet101": _torchvision([3, 4, 23, 3], 2048, 15.7),
                "resnet152": _torchvision([3, 8, 36, 3], 2048, 23.1),
                "wide_resnet50_2": _torchvision([3, 4, 6, 3], 2048, 22.8),
                "wide_resnet101_2": _torchvision([3, 4, 23, 3], 2048, 45.6),
                "resnext50_32x4d": _torchvision([3, 4, 6, 3], 2048, 8.5),
                "resnext101_32x8d": _torchvision([3, 4, 23, 3], 2048, 33.0),
                "resnext101_64x4d": _torchvision([3, 4, 23, 3], 2048, 31.0),
            }
        ),
    )
)
