"""ResNets in torchvision's layout: building, loading, and their adapter.

A stored ResNet is ``model.safetensors`` plus ``config.json`` naming the architecture: either a
torchvision one (``"architecture": "resnet50"``) or ``"resnet"`` with its blocks per stage,
stage widths and stem, built by :class:`ResNet`, which keeps torchvision's module names
(``conv1, bn1, layer1.. layerN, fc``) so one adapter reads both.

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
from workflow_scripts.models.store import CONFIG, WEIGHTS

BLOCKS = {"basic": tv.BasicBlock, "bottleneck": tv.Bottleneck}
# the preprocessing of the built-in 32x32 images: scale to [-1, 1]
SMALL_IMAGE_PREPROCESS = {"resize": None, "crop": None, "mean": [0.5] * 3, "std": [0.5] * 3}


class ChannelRMSNorm(nn.Module):
    """RMSNorm over channels at every position, with one scalar gain and no bias: it commutes
    with rotations of the channels, so it privileges no channel basis (BatchNorm's per-channel
    scale and shift do)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps) * self.weight


NORMS = {"batch": nn.BatchNorm2d, "rms": ChannelRMSNorm}


class ResNet(tv.ResNet):
    """torchvision's ResNet with any number of stages, any stage widths, and a choice of stem:
    ``imagenet`` (7x7 stride-2 convolution and max-pool) or ``cifar`` (3x3 stride-1, no pool,
    for 32x32 images)."""

    def __init__(self, block: str, layers: list[int], widths: list[int], num_classes: int,
                 stem: str = "imagenet", norm_layer=None):
        nn.Module.__init__(self)
        block_class = BLOCKS[block]
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
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
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block_class.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
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


def build(spec: dict) -> tuple[nn.Module, dict]:
    """A random-initialised ResNet from ``spec`` and the config.json that describes it."""
    arch = spec["arch"]
    config = {"family": "resnet", "architecture": "resnet", "block": arch.get("block", "basic"),
              "layers": list(arch["layers"]), "widths": list(arch["widths"]),
              "stem": arch.get("stem", "imagenet"), "num_classes": spec.get("num_labels", 10),
              "norm": arch.get("norm", "batch"),
              "preprocess": SMALL_IMAGE_PREPROCESS if arch.get("stem") == "cifar" else
              imagenet_preprocess(resize=256, crop=224)}
    torch.manual_seed(spec.get("seed", 0))
    return from_config(config).eval(), config


def imagenet_preprocess(resize: int, crop: int) -> dict:
    return {"resize": resize, "crop": crop, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225]}


def from_config(config: dict) -> nn.Module:
    if config["architecture"] == "resnet":
        return ResNet(config["block"], config["layers"], config["widths"], config["num_classes"],
                      stem=config["stem"], norm_layer=NORMS[config.get("norm", "batch")])
    return torchvision.models.get_model(config["architecture"], weights=None,
                                        num_classes=config["num_classes"])


def load(directory: str | Path, family: str = "resnet") -> tuple[nn.Module, dict]:
    """The model stored in ``directory`` and its config.json."""
    config = json.loads(Path(directory, CONFIG).read_text())
    model = from_config(config)
    model.load_state_dict(load_file(Path(directory, WEIGHTS)))
    return model.eval(), config


# the family interface (see ``workflow_scripts.models``)
init = build


def write(model: nn.Module, config: dict, directory: str | Path) -> None:
    """Weights and config.json in the stored layout."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, Path(directory, WEIGHTS))
    Path(directory, CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def adapter(model: nn.Module, config: dict, family: str, final_readout: str) -> "ResNetAdapter":
    return ResNetAdapter(model, config["preprocess"], config.get("label_names"))


class ShortcutOnly(nn.Module):
    """A residual block with its branch removed: ``relu(shortcut(x))``, where the shortcut is
    the identity or the block's downsample projection. (The block computes
    ``relu(branch(x) + shortcut(x))``.)"""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x if self.downsample is None else self.downsample(x))


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

    def streams(self, inputs):
        x = self.stem(inputs["pixel_values"])
        out = []
        for stage in self.stages:
            for block in stage:
                x = block(x)
                out.append(x.mean(dim=(2, 3)))
        return out

    def forward(self, inputs):
        return self.model(inputs["pixel_values"])

    def logits(self, inputs):
        return self.model(inputs["pixel_values"])

    def without_branch(self, block):
        return ShortcutOnly(block)

    def blocks_applied(self, readout: int) -> int:
        return readout + 1
