"""Model inputs from a stored dataset: tokenized text or preprocessed images, in batches.

Rows are read from the stored dataset one batch at a time (only the row groups that hold them).
Text is tokenized per batch (truncated to ``max_tokens``) and padded to the batch's longest
example or to ``max_tokens``; images are decoded and preprocessed in DataLoader workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from workflow_scripts.data import store
from workflow_scripts.data.store import DatasetError, DatasetFile


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


def _labels(frame) -> np.ndarray | None:
    return frame["label"].to_numpy() if "label" in frame else None


def text_batches(
    tokenizer,
    dataset: DatasetFile,
    start: int,
    stop: int,
    batch_size: int,
    max_tokens: int,
    padding: str,
) -> Iterator[Batch]:
    """The batches of rows [start, stop) of a text dataset (pairs or plain text), tokenized
    (truncated to ``max_tokens``) and padded one batch at a time."""
    columns = ["example_id", "premise", "hypothesis", "label"]
    if dataset.kind == "text":
        columns = ["example_id", "text"]
    for frame in dataset.batches(start, stop, batch_size, columns):
        if dataset.kind == "text":
            texts = [list(frame["text"])]
        else:
            texts = [list(frame["premise"]), list(frame["hypothesis"])]
        inputs = tokenizer(
            *texts,
            truncation=True,
            max_length=max_tokens,
            padding=padding,
            return_tensors="pt",
        )
        yield Batch(
            dict(inputs),
            frame["example_id"].to_numpy(),
            (inputs["attention_mask"] == 0).numpy(),
            _labels(frame),
        )


class ImageBatches(torch.utils.data.Dataset):
    """Item ``i``: the ``i``-th batch of rows [start, stop) of an image dataset, decoded and
    preprocessed (read in the process that asks, so a DataLoader's workers share the work)."""

    def __init__(self, path, start: int, stop: int, batch_size: int, preprocess: dict):
        self.path, self.start, self.stop = path, start, stop
        self.batch_size, self.preprocess = batch_size, preprocess
        self._dataset: DatasetFile | None = None

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def __getitem__(self, i: int) -> dict:
        if self._dataset is None:
            self._dataset = DatasetFile(self.path)
        first = self.start + i * self.batch_size
        part = self._dataset.read(first, min(self.stop, first + self.batch_size))
        pixels = [
            preprocess_image(store.decode_image(data, f"example {i}"), self.preprocess)
            for i, data in zip(part["example_id"], part["image"])
        ]
        batch = {
            "pixel_values": stack_images(pixels, self.path),
            "example_id": part["example_id"].to_numpy(copy=True),
        }
        if "label" in part:
            batch["labels"] = part["label"].to_numpy(copy=True)
        return batch


def loader(batches, workers: int, pin_memory: bool, persistent: bool = False):
    """A DataLoader over a dataset whose items are whole batches: ``workers`` processes (none:
    this one), each four batches ahead; the order is the items' whatever the workers."""
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=persistent and workers > 0,
    )


def stack_images(pixels: list[torch.Tensor], where) -> torch.Tensor:
    """One batch tensor of preprocessed images, which must have one size."""
    shapes = {tuple(p.shape) for p in pixels}
    if len(shapes) > 1:
        raise DatasetError(
            f"{where}: images of different sizes {sorted(shapes)} in one batch and the "
            "model's preprocessing does not crop; set image_resize on the dataset or use a "
            "model with a crop"
        )
    return torch.stack(pixels)


def image_batches(
    preprocess: dict,
    dataset: DatasetFile,
    start: int,
    stop: int,
    batch_size: int,
    workers: int = 0,
) -> Iterator[Batch]:
    """The batches of rows [start, stop) of an image dataset, decoded by ``workers`` DataLoader
    processes (in this one with none), a few batches ahead."""
    batches = ImageBatches(dataset.path, start, stop, batch_size, preprocess)
    for item in loader(batches, workers, pin_memory=torch.cuda.is_available()):
        yield Batch(
            {"pixel_values": item["pixel_values"]},
            np.asarray(item["example_id"]),
            None,
            np.asarray(item["labels"]) if "labels" in item else None,
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
