"""The interface every model family implements for extraction and ablation."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from workflow_scripts.models.placement import input_device


@dataclass(frozen=True)
class Readout:
    """One point where the residual stream is read: its order, place and width.

    ``stage`` and ``block`` place the point in the network: for transformers stage is 0 and block
    counts from 0 for the embedding output; for ResNets stage counts from 1 and block from 0
    within the stage, so stage boundaries can be drawn.
    """

    index: int
    stage: int
    block: int
    name: str
    width: int

    def as_dict(self) -> dict:
        return asdict(self)


class Adapter:
    """A loaded model in eval mode with its read-out points and residual blocks.

    Subclasses set ``modality`` ("text" or "image"), ``pooling``, ``readouts``, ``head`` (the
    kind of output: causal_lm, masked_lm, sequence_classification, image_classification),
    ``num_labels`` and ``block_slots`` (where each residual block sits: its container and
    index, in order), and implement :meth:`streams`, :meth:`logits`, :meth:`without_branch` and
    :meth:`blocks_applied` (and :meth:`output_weights` where the head reads a read-out point
    directly).
    """

    modality: str
    pooling: str
    readouts: list[Readout]
    head: str
    num_labels: int | None
    label_names: list[str] | None = None  # the head's class names, where the model has them
    final_norm: nn.Module | None = None  # the norm between the last block and the head, if any
    shortcut_relu: bool = True  # an ablated block ends with its activation (see ``ablated``)
    block_slots: list[tuple[nn.Module, int]]

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    @property
    def split(self) -> bool:
        """Whether accelerate placed the model over several devices (``device_map``)."""
        return bool(getattr(self.model, "hf_device_map", None))

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go (a split model's main device: see
        ``models.placement.input_device``)."""
        return input_device(self.model)

    def to(self, device: torch.device | str) -> Adapter:
        self.model.to(device)
        return self

    def place(self, choice: str) -> torch.device:
        """Put the model on the device ``choice`` names (auto, cpu, cuda; see
        ``batches.pick_device``) and return it; a split model stays where accelerate put it,
        and its main device is returned."""
        if self.split:
            return self.device
        from workflow_scripts.batches import pick_device

        device = pick_device(choice)
        self.model.to(device)
        return device

    def streams(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The stream at every read-out point for one batch, in read-out order.

        Text: ``[batch, tokens, width]`` each; images: ``[batch, width]`` (spatial mean).
        """
        raise NotImplementedError

    def forward(self, inputs: dict[str, torch.Tensor]):
        """The bare forward pass of the underlying network on the same inputs."""
        raise NotImplementedError

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own output: class logits ``[batch, classes]`` or, for language models,
        next-token logits ``[batch, tokens, vocabulary]``."""
        raise NotImplementedError

    def without_branch(self, block: nn.Module) -> nn.Module:
        """What stands in for ``block`` when it is ablated: its shortcut alone (where a block
        ends with an activation, followed by it unless ``self.shortcut_relu`` is false)."""
        raise NotImplementedError

    def blocks_applied(self, readout: int) -> int:
        """How many residual blocks produce the stream at read-out point ``readout``."""
        raise NotImplementedError

    def output_weights(self, readout: int) -> tuple[str, torch.Tensor] | None:
        """("class" or "token", the matrix ``[outputs, width]`` through which the head reads
        read-out point ``readout`` directly), or None where it does not (the default)."""
        return None

    @contextlib.contextmanager
    def ablated(self, blocks: set[int], final_norm: bool = True, shortcut_relu: bool = True):
        """Run the model with the residual branch of every block in ``blocks`` removed;
        ``final_norm=False`` also passes the stream through the final norm unchanged (the head
        reads the raw stream), ``shortcut_relu=False`` drops the activation that ends an ablated
        block (see :meth:`without_branch`)."""
        originals = {}
        bypass = None
        self.shortcut_relu = shortcut_relu
        try:
            for i in sorted(blocks):
                container, index = self.block_slots[i]
                originals[i] = container[index]
                container[index] = self.without_branch(container[index])
            if not final_norm and self.final_norm is not None:
                bypass = self.final_norm.register_forward_hook(lambda m, args, out: args[0])
            yield self
        finally:
            del self.shortcut_relu  # back to the class's default
            if bypass is not None:
                bypass.remove()
            for i, block in originals.items():
                container, index = self.block_slots[i]
                container[index] = block
