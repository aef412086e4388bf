"""The interface every model family implements for extraction (and later ablation)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


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
    """A loaded model in eval mode with its read-out points.

    Subclasses set ``modality`` ("text" or "image"), ``pooling`` and ``readouts`` and implement
    :meth:`streams`.
    """
    modality: str
    pooling: str
    readouts: list[Readout]

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> "Adapter":
        self.model.to(device)
        return self

    def streams(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The stream at every read-out point for one batch, in read-out order.

        Text: ``[batch, tokens, width]`` each; images: ``[batch, width]`` (spatial mean).
        """
        raise NotImplementedError

    def forward(self, inputs: dict[str, torch.Tensor]):
        """The bare forward pass of the underlying network on the same inputs."""
        raise NotImplementedError
