"""ResNets in torchvision's layout: building, loading, and their adapter.

A stored ResNet is ``model.safetensors`` plus ``config.json``, which the model carries as the
dict ``model.config``: ``architecture`` is a torchvision one (``"resnet50"``) or ``"resnet"``,
built by :class:`ResNet` from its ``block``, blocks per stage (``layers``), stage ``widths``,
``stem`` and ``norm``; ``num_classes``, ``preprocess`` (how images are prepared) and, where
known, ``label_names``. :class:`ResNet` keeps torchvision's module names (``conv1, bn1,
layer1.. layerN, fc``), so one adapter reads both. A ResNet has no tokenizer: the family
interface passes and returns None for it.

Read-out points: the output of every residual block, mean-pooled over space, labelled with its
stage (1-based, torchvision's ``layerN``) and its block within the stage (0-based).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import resnet as tv

from workflow_scripts.models.adapter import Adapter, Readout
from workflow_scripts.models.norms import ScalarRMSNorm
from workflow_scripts.models.placement import refuse_split
from workflow_scripts.models.precision import torch_dtype
from workflow_scripts.models.store import CONFIG, WEIGHTS
from workflow_scripts.options.placement import Placement

BLOCKS = {"basic": tv.BasicBlock, "bottleneck": tv.Bottleneck}
# the preprocessing of the built-in 32x32 images: scale to [-1, 1]
SMALL_IMAGE_PREPROCESS = {"resize": None, "crop": None, "mean": [0.5] * 3, "std": [0.5] * 3}


def channel_rms_norm(channels: int) -> ScalarRMSNorm:
    """A ScalarRMSNorm over the channels at every position, as a norm layer (called with the
    channel count, which one scalar gain does not need): unlike BatchNorm's per-channel scale
    and shift, it privileges no channel basis."""
    return ScalarRMSNorm(dim=1)


NORMS = {"batch": nn.BatchNorm2d, "rms": channel_rms_norm}


class ResNet(nn.Module):
    """A ResNet of torchvision's blocks with any number of stages, any stage widths, and a
    choice of stem: ``imagenet`` (7x7 stride-2 convolution and max-pool) or ``cifar`` (3x3
    stride-1, no pool, for 32x32 images). ``norm_layer(channels)`` makes every norm."""

    def __init__(
        self,
        block: str,
        layers: list[int],
        widths: list[int],
        num_classes: int,
        stem: str = "imagenet",
        norm_layer=None,
    ):
        super().__init__()
        block_class = BLOCKS[block]
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = self._norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        for i, (depth, width) in enumerate(zip(layers, widths)):
            stage = self._make_layer(block_class, width, depth, stride=1 if i == 0 else 2)
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block_class.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[nn.Module], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        """A stage of ``blocks`` blocks of width ``planes``; its first block takes the stride
        and the change of channels, its shortcut projecting where they change."""
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                tv.conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, norm_layer=norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in stages(self):
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def stages(model: nn.Module) -> list[nn.Sequential]:
    """``layer1, layer2, ...`` of a torchvision-layout ResNet, in order."""
    found, i = [], 1
    while hasattr(model, f"layer{i}"):
        found.append(getattr(model, f"layer{i}"))
        i += 1
    return found


def imagenet_preprocess(resize: int, crop: int) -> dict:
    """The preprocessing of ImageNet models: resize, centre crop, ImageNet mean and std."""
    return {
        "resize": resize,
        "crop": crop,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }


def from_config(config: dict) -> nn.Module:
    """A random-initialised model of ``config`` (a stored config.json), carrying it as
    ``model.config``."""
    if config["architecture"] == "resnet":
        model = ResNet(
            config["block"],
            config["layers"],
            config["widths"],
            config["num_classes"],
            stem=config["stem"],
            norm_layer=NORMS[config.get("norm", "batch")],
        )
    else:
        model = torchvision.models.get_model(
            config["architecture"], weights=None, num_classes=config["num_classes"]
        )
    model.config = config
    return model


def build(spec: dict) -> nn.Module:
    """A random-initialised ResNet from ``spec`` (arch: block, layers, widths, stem, norm;
    num_labels, seed)."""
    arch = spec["arch"]
    small = arch.get("stem") == "cifar"
    config = {
        "family": "resnet",
        "architecture": "resnet",
        "block": arch.get("block", "basic"),
        "layers": list(arch["layers"]),
        "widths": list(arch["widths"]),
        "stem": arch.get("stem", "imagenet"),
        "num_classes": spec.get("num_labels", 10),
        "norm": arch.get("norm", "batch"),
        "preprocess": dict(SMALL_IMAGE_PREPROCESS)
        if small
        else imagenet_preprocess(resize=256, crop=224),
    }
    torch.manual_seed(spec.get("seed", 0))
    return from_config(config).eval()


# the family interface (see ``workflow_scripts.models``)
def init(spec: dict, tokenizer=None) -> tuple[nn.Module, None]:
    """A random-initialised ResNet of ``spec``, and no tokenizer."""
    return build(spec), None


def load(
    directory: str | Path,
    family: str,
    head: str | None = None,
    num_labels: int | None = None,
    dtype: str | None = None,
    placement: Placement | None = None,
) -> tuple[nn.Module, None]:
    """The model stored in ``directory`` (carrying its config.json) in ``dtype`` (float32 by
    default; see ``workflow_scripts.models.precision``), and no tokenizer; a ResNet keeps its
    stored head and classes, and is loaded whole (``placement`` may not split it)."""
    refuse_split(placement, family)
    config = json.loads(Path(directory, CONFIG).read_text())
    if head not in (None, "image_classification"):
        raise ValueError(f"family resnet has only the image_classification head, not {head!r}")
    if num_labels not in (None, config["num_classes"]):
        raise ValueError(
            f"{directory}: a ResNet keeps its {config['num_classes']} classes, not {num_labels}"
        )
    model = from_config(config)
    state = load_file(Path(directory, WEIGHTS))
    model.load_state_dict(state)
    stored = next(v.dtype for v in state.values() if v.is_floating_point())
    return model.to(torch_dtype(dtype, stored)).eval(), None


def write(model: nn.Module, tokenizer, directory: str | Path) -> None:
    """Weights and config.json (``model.config``) in the stored layout."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, Path(directory, WEIGHTS))
    Path(directory, CONFIG).write_text(json.dumps(model.config, indent=2, sort_keys=True) + "\n")


def adapter(model: nn.Module, tokenizer, family: str, final_readout: str) -> ResNetAdapter:
    return ResNetAdapter(model, model.config["preprocess"], model.config.get("label_names"))


class ShortcutOnly(nn.Module):
    """A residual block with its branch removed: ``relu(shortcut(x))``, where the shortcut is
    the identity or the block's downsample projection (the block computes
    ``relu(branch(x) + shortcut(x))``); ``relu=False``: ``shortcut(x)`` alone, as the study."""

    def __init__(self, block: nn.Module, relu: bool = True):
        super().__init__()
        self.downsample = block.downsample
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.downsample is None else self.downsample(x)
        return torch.relu(x) if self.relu else x


class ResNetAdapter(Adapter):
    modality = "image"
    pooling = "spatial_mean"

    def __init__(self, model: nn.Module, preprocess: dict, label_names: list[str] | None = None):
        super().__init__(model)
        self.label_names = label_names
        self.preprocess = preprocess
        self.stages = stages(model)
        self.head = "image_classification"
        self.num_labels = model.fc.out_features
        self.block_slots = [(stage, b) for stage in self.stages for b in range(len(stage))]
        self.readouts = []
        for s, stage in enumerate(self.stages, start=1):
            for b, block in enumerate(stage):
                width = (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels
                self.readouts.append(Readout(len(self.readouts), s, b, f"layer{s}.{b}", width))

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.maxpool(m.relu(m.bn1(m.conv1(x))))

    def pixels(self, inputs) -> torch.Tensor:
        """The images in the model's dtype."""
        return inputs["pixel_values"].to(self.model.fc.weight.dtype)

    def streams(self, inputs):
        x = self.stem(self.pixels(inputs))
        out = []
        for stage in self.stages:
            for block in stage:
                x = block(x)
                out.append(x.mean(dim=(2, 3)))
        return out

    def forward(self, inputs):
        return self.model(self.pixels(inputs))

    def logits(self, inputs):
        return self.model(self.pixels(inputs))

    def without_branch(self, block):
        return ShortcutOnly(block, self.shortcut_relu)

    def blocks_applied(self, readout: int) -> int:
        return readout + 1

    def output_weights(self, readout):
        """The classifier (fc), which reads the last block's output through average pooling."""
        if readout == len(self.readouts) - 1:
            return "class", self.model.fc.weight.detach()
        return None
