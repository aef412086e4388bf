"""Source strings (``scheme:rest``) of models and datasets, and what kind of data each holds."""
from __future__ import annotations

TEXT_FAMILIES = {"gpt2", "gptr2", "roberta", "bert", "decoder"}
# The module that builds, stores and loads the models of each family. A stage that runs a
# model imports only its family's module (by name, through ``models.family_module``), and its
# rule declares only that module's files as code inputs: an edit to the ResNet code does not
# rerun a transformer's extraction.
FAMILY_MODULES = {
    **{family: "workflow_scripts.models.transformers_text"
       for family in ("bert", "gpt2", "gptr2", "roberta")},
    "decoder": "workflow_scripts.models.hf_decoder",  # Llama, Qwen2, Mistral, GPT-NeoX
    "resnet": "workflow_scripts.models.resnet",
}
BUILTIN_KINDS = {"pairs": "pairs", "corpus": "text", "shapes": "image"}


def source_scheme(source: str) -> tuple[str, str]:
    """``"hf:gpt2@main"`` -> ``("hf", "gpt2@main")``."""
    scheme, _, rest = source.partition(":")
    return scheme, rest


def dataset_kind(spec: dict) -> str:
    """pairs, text or image: given by the source where it can, else by the ``kind`` key."""
    scheme, rest = source_scheme(spec["source"])
    if scheme == "builtin":
        return BUILTIN_KINDS[rest]
    if scheme == "imagefolder":
        return "image"
    return spec["kind"]


DEFAULT_HEADS = {"gpt2": "causal_lm", "gptr2": "causal_lm", "roberta": "sequence_classification",
                 "bert": "sequence_classification", "decoder": "causal_lm",
                 "resnet": "image_classification"}


# the head a model needs to be scored on each kind of dataset by ablation
ABLATION_HEADS = {"pairs": "sequence_classification", "image": "image_classification",
                  "text": "causal_lm"}


def model_head(spec: dict) -> str:
    """The kind of output a model has: its ``head`` key, else its family's default."""
    return spec.get("head", DEFAULT_HEADS[spec["family"]])


def model_kind(spec: dict) -> str:
    """text or image: what a model of this family reads."""
    return "text" if spec["family"] in TEXT_FAMILIES else "image"


# blocks per stage of the torchvision ResNet architectures
TORCHVISION_RESNETS = {
    "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3],
    "resnet101": [3, 4, 23, 3], "resnet152": [3, 8, 36, 3],
    "wide_resnet50_2": [3, 4, 6, 3], "wide_resnet101_2": [3, 4, 23, 3],
    "resnext50_32x4d": [3, 4, 6, 3], "resnext101_32x8d": [3, 4, 23, 3],
    "resnext101_64x4d": [3, 4, 23, 3],
}


def readout_count(spec: dict) -> int:
    """The number of read-out points of a model, from its config entry alone (no fetching):
    transformers read the embedding output and every block's output, ResNets every block's."""
    scheme, rest = source_scheme(spec["source"])
    if scheme == "torchvision":
        return sum(TORCHVISION_RESNETS[rest])
    if scheme == "init":
        layers = spec["arch"]["layers"]
        return sum(layers) if spec["family"] == "resnet" else layers + 1
    blocks = spec["blocks"]
    return blocks if spec["family"] == "resnet" else blocks + 1
