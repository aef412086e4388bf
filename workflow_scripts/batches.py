"""Model inputs from a stored dataset: tokenized text or preprocessed images, in batches.

Text is tokenized once up front (truncated to ``max_tokens``) and padded per batch, to the
batch's longest example or to ``max_tokens``; images are decoded and preprocessed lazily, one
batch at a time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from workflow_scripts.data import store
from workflow_scripts.data.store import DatasetError


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    example_id: np.ndarray  # per example
    padding: np.ndarray | None  # [examples, tokens] bool for text, None for images
    labels: np.ndarray | None  # per example, where the dataset has labels


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is cuda, but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def autocast(device: torch.device, dtype: str | None):
    """Autocast to ``dtype`` on CUDA; nothing on the CPU or without a dtype."""
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, dtype))


def _labels(frame, start: int, stop: int) -> np.ndarray | None:
    return frame["label"].to_numpy()[start:stop] if "label" in frame else None


def text_batches(
    tokenizer, frame, kind: str, batch_size: int, max_tokens: int, padding: str
) -> list[Batch]:
    """Every batch of a text frame (pairs or plain text)."""
    if kind == "pairs":
        encoded = tokenizer(
            list(frame["premise"]),
            list(frame["hypothesis"]),
            truncation=True,
            max_length=max_tokens,
        )
    else:
        encoded = tokenizer(list(frame["text"]), truncation=True, max_length=max_tokens)
    ids = frame["example_id"].to_numpy()
    batches = []
    for start in range(0, len(frame), batch_size):
        stop = start + batch_size
        inputs = tokenizer.pad(
            {k: v[start:stop] for k, v in encoded.items()},
            padding=padding,
            max_length=max_tokens,
            return_tensors="pt",
        )
        batches.append(
            Batch(
                dict(inputs),
                ids[start:stop],
                (inputs["attention_mask"] == 0).numpy(),
                _labels(frame, start, stop),
            )
        )
    return batches


def image_batches(preprocess: dict, frame, batch_size: int):
    """Every batch of an image frame, decoded lazily (a generator)."""
    for start in range(0, len(frame), batch_size):
        part = frame.iloc[start : start + batch_size]
        pixels = [
            preprocess_image(store.decode_image(data, f"example {i}"), preprocess)
            for i, data in zip(part["example_id"], part["image"])
        ]
        shapes = {tuple(p.shape) for p in pixels}
        if len(shapes) > 1:
            raise DatasetError(
                f"images of different sizes {sorted(shapes)} in one batch and "
                "the model's preprocessing does not crop; set image_resize "
                "on the dataset or use a model with a crop"
            )
        yield Batch(
            {"pixel_values": torch.stack(pixels)},
            part["example_id"].to_numpy(),
            None,
            _labels(frame, start, start + batch_size),
        )


def preprocess_image(image, preprocess: dict) -> torch.Tensor:
    """Resize (shorter side), centre-crop and normalise as the model's config says."""
    from torchvision.transforms.v2 import functional as F

    x = F.to_dtype(F.to_image(image), torch.float32, scale=True)
    if preprocess.get("resize"):
        x = F.resize(x, preprocess["resize"], antialias=True)
    if preprocess.get("crop"):
        x = F.center_crop(x, preprocess["crop"])
    return F.normalize(x, preprocess["mean"], preprocess["std"])
