"""ResNets in torchvision's layout: torchvision's own architectures by name, or built here from
blocks per stage, stage widths, stem and norm. Read-outs: every block's output, mean-pooled."""

from collections.abc import Mapping

from workflow_scripts.families import Architecture, Family, ModelSize, not_whole, register


def check_arch(where: str, arch: Mapping) -> str | None:
    if not isinstance(arch.get("layers"), list):
        return (
            f"{where}.layers: {arch.get('layers')!r}; a ResNet needs a list of blocks per "
            "stage, e.g. [2, 2, 2, 2]"
        )
    if problem := not_whole(where, arch):
        return problem
    if len(arch.get("widths", [])) != len(arch["layers"]):
        return (
            f"{where}.widths: {arch.get('widths')!r}; needs one width per stage "
            f"({len(arch['layers'])})"
        )
    return None


def resnet_size(family: Family, blocks: int, arch: Mapping, width: int, vocabulary: bool):
    """ResNet-18 (8 basic blocks, widths 64..512) has 11.7M parameters and does 3.6 GFLOPs per
    224 x 224 image: both scaled by the last width squared and the depth, bottlenecks as ResNet-50
    against ResNet-34; a twelfth of the FLOPs for 32 x 32 inputs without the stride-4 stem."""
    widths = arch.get("widths", [64, 128, 256, 512])
    if "widths" in arch:
        width = widths[-1] * (4 if arch.get("block") == "bottleneck" else 1)
    scale = (widths[-1] / 512) ** 2 * blocks / 8
    flops, parameters = 3.6e9 * scale, 11.7e6 * scale
    if arch.get("block") == "bottleneck":
        flops, parameters = flops * 8.2 / 7.3, parameters * 25.6 / 21.8
    if arch.get("stem") == "cifar":
        flops /= 12
    return ModelSize(family.readouts(blocks), width, parameters, flops)


def _torchvision(
    blocks_per_stage: list[int], width: int, gflops: float, millions: float
) -> Architecture:
    """torchvision's figures: GFLOPs (2 x its GMACs) and millions of parameters."""
    return Architecture(sum(blocks_per_stage), width, gflops * 1e9, millions * 1e6)


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
        check_arch=check_arch,
        estimate=resnet_size,
        trained_by=("image_classification",),
        embedding_readout=False,
        architectures={
            "resnet18": _torchvision([2, 2, 2, 2], 512, 3.6, 11.7),
            "resnet34": _torchvision([3, 4, 6, 3], 512, 7.3, 21.8),
            "resnet50": _torchvision([3, 4, 6, 3], 2048, 8.2, 25.6),
            "resnet101": _torchvision([3, 4, 23, 3], 2048, 15.7, 44.5),
            "resnet152": _torchvision([3, 8, 36, 3], 2048, 23.1, 60.2),
            "wide_resnet50_2": _torchvision([3, 4, 6, 3], 2048, 22.8, 68.9),
            "wide_resnet101_2": _torchvision([3, 4, 23, 3], 2048, 45.6, 126.9),
            "resnext50_32x4d": _torchvision([3, 4, 6, 3], 2048, 8.5, 25.0),
            "resnext101_32x8d": _torchvision([3, 4, 23, 3], 2048, 33.0, 88.8),
            "resnext101_64x4d": _torchvision([3, 4, 23, 3], 2048, 31.0, 83.5),
        },
    )
)
