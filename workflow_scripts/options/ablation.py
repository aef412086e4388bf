"""The options of the ablation stage."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AblationOptions:
    """How a model is scored under head and tail ablation (``ablation``, without analyses)."""

    batch_size: int
    max_tokens: int
    padding: str
    device: str
    autocast: str | None
    final_norm: bool  # tail ablation: the stream passes the final norm before the head
    shortcut_relu: bool  # ResNets: an ablated block passes relu(shortcut(x))
