"""Normalisations that give no basis direction of the stream a privileged role."""

from __future__ import annotations

import torch
from torch import nn


class ScalarRMSNorm(nn.Module):
    """RMSNorm with one scalar gain and no bias: ``x * rsqrt(mean(x^2) + eps) * weight``, the
    mean taken over ``dim``. It commutes with rotations along ``dim``, unlike LayerNorm and
    BatchNorm, whose per-channel gains and biases single out the channel basis.

    ``dim=-1`` normalises a transformer's stream (the study's gptr2); ``dim=1`` the channels of
    a ResNet's feature map at every position.
    """

    def __init__(self, dim: int = -1, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(self.dim, keepdim=True) + self.eps) * self.weight
