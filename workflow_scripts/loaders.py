"""Training data through torch's DataLoader: whole batches made in worker processes.

Every batch is a pure function of the run's seed and the step, whatever the number of workers,
so a run resumed from its checkpoint, or run with more cores, sees the same batches:

* the examples are split once into a held-out part and a training part (seeded);
* each epoch is a seeded permutation of the training part, without replacement, so
  ``epochs: 1`` sees every example once. Token blocks (random access is free in the memory-mapped
  token file) are permuted freely; rows of the Parquet file are *block-shuffled*: the row groups
  are permuted, and rows are permuted within windows of a few consecutive groups, so a batch
  reads about twice its own bytes, not a row group per row;
* step ``s`` takes positions ``[s x batch, (s + 1) x batch)`` of the epochs laid end to end;
* images are decoded and augmented in the workers, each example with a generator seeded by
  (seed, epoch, example id), and travel to the main process as uint8; they are scaled and
  normalised on the device (:func:`normalise`).

ImageNet-style models (a preprocessing with a crop) train on the standard recipe,
RandomResizedCrop to the crop size and a horizontal flip, and are evaluated on resize and centre
crop; small images (no crop, e.g. the built-in 32-pixel shapes) are used as they are.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from workflow_scripts.batches import stack_images
from workflow_scripts.data import store
from workflow_scripts.data.store import DatasetError, DatasetFile

HELD_OUT_PIECES = 8  # the held-out part is at least this many runs of consecutive rows


def example_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# --- which examples, in which order ----------------------------------------------------------


def held_out_rows(rows: int, fraction: float, seed: int, unit: int) -> np.ndarray:
    """Sorted positions of the held-out part: ``round(rows x fraction)`` rows (at least one) in
    runs of consecutive rows, whole row groups of ``unit`` rows where there are enough, so that
    evaluating reads only the row groups that hold them."""
    wanted = max(1, round(rows * fraction))
    if wanted >= rows:
        raise DatasetError(f"{rows} examples leave none to train on after holding out {wanted}")
    piece = max(1, min(unit, wanted // HELD_OUT_PIECES))
    chosen = np.random.default_rng([seed, 1]).permutation(math.ceil(rows / piece))
    positions = (chosen[:, None] * piece + np.arange(piece)).ravel()
    return np.sort(positions[positions < rows][:wanted])


class EpochOrder:
    """The training positions of each epoch, in order (see the module's docstring).
    ``group_starts``: the row groups' first rows, for block shuffling in windows of
    ``window_groups`` groups; None to permute freely."""

    def __init__(
        self,
        rows: int,
        held_out: np.ndarray,
        seed: int,
        group_starts: np.ndarray | None = None,
        window_groups: int = 1,
    ):
        self.train = np.setdiff1d(np.arange(rows), held_out, assume_unique=True)
        self.seed, self.group_starts, self.window_groups = seed, group_starts, window_groups
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.train)

    def __call__(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._order(epoch))
        return self._cached[1]

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2, epoch])
        if self.group_starts is None:
            return rng.permutation(self.train)
        groups = len(self.group_starts) - 1
        rank = np.empty(groups, np.int64)
        rank[rng.permutation(groups)] = np.arange(groups)
        group_of = np.searchsorted(self.group_starts, self.train, side="right") - 1
        window = rank[group_of] // self.window_groups
        return self.train[np.lexsort((rng.random(len(self.train)), window))]

    def positions(
        self, step: int, batch_size: int, total: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Step ``step``'s positions in the dataset, and the epoch each comes from; ``total``:
        the examples the run sees in all (its last batch may be short)."""
        n = len(self.train)
        stop = (step + 1) * batch_size if total is None else min((step + 1) * batch_size, total)
        flat = np.arange(step * batch_size, stop)
        epochs = flat // n
        out = np.empty(len(flat), np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self(int(epoch))[flat[mask] - epoch * n]
        return out, epochs


def steps_for(spec: dict, train_examples: int) -> tuple[int, int | None]:
    """The run's number of steps and the examples it sees in all: ``steps`` full batches, or
    ``epochs`` over the training examples (None: no limit but the steps)."""
    if "epochs" in spec:
        total = round(spec["epochs"] * train_examples)
        return math.ceil(total / spec["batch_size"]), total
    return spec["steps"], None


# --- reading examples -------------------------------------------------------------------------


class TokenExamples:
    """Blocks of ``context`` tokens from a memory-mapped token file."""

    def __init__(self, path: str | Path, context: int):
        self.path, self.context = str(path), context
        tokens = np.load(self.path, mmap_mode="r")
        self.rows = len(tokens) // context
        if self.rows < 2:
            raise DatasetError(
                f"{path} holds {len(tokens)} tokens: fewer than two blocks of {context}"
            )
        self._tokens = None
        self.group_starts = None  # random access is free

    def __call__(self, positions, epochs=None, train=True) -> dict:
        if self._tokens is None:  # opened in the process that reads
            self._tokens = np.load(self.path, mmap_mode="r")
        blocks = np.stack(
            [self._tokens[p * self.context : (p + 1) * self.context] for p in positions]
        )
        return {"input_ids": torch.from_numpy(blocks.astype(np.int64))}


class ParquetExamples:
    """Rows of a stored dataset, read from the row groups that hold them (a few cached)."""

    def __init__(self, path: str | Path, kind: str):
        self.path = str(path)
        dataset = DatasetFile(path)
        if dataset.kind != kind:
            raise DatasetError(f"{path} holds {dataset.kind}: this run needs a {kind} dataset")
        self.rows, self.group_starts = dataset.rows, dataset.group_starts
        self.row_group_rows, self.label_names = dataset.row_group_rows, dataset.label_names
        self._dataset: DatasetFile | None = None
        self._groups: OrderedDict = OrderedDict()
        self.cached_groups = 4

    def labels(self) -> np.ndarray:
        return DatasetFile(self.path).column("label")

    def rows_at(self, positions: np.ndarray, columns: list[str]):
        if self._dataset is None:  # opened in the process that reads
            self._dataset = DatasetFile(self.path)
        groups = self._dataset.group_of(positions)
        out = {c: [None] * len(positions) for c in columns}
        for group in np.unique(groups):
            table = self._groups.get(group)
            if table is None:
                table = self._dataset.read_group(int(group), columns).to_pydict()
                self._groups[group] = table
                if len(self._groups) > self.cached_groups:
                    self._groups.popitem(last=False)
            for i in np.flatnonzero(groups == group):
                local = positions[i] - self.group_starts[group]
                for c in columns:
                    out[c][i] = table[c][local]
        return out


class PairExamples(ParquetExamples):
    """Sentence pairs, tokenized in the worker and padded to the batch's longest."""

    def __init__(self, path, tokenizer, max_tokens: int):
        super().__init__(path, "pairs")
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, positions, epochs=None, train=True) -> dict:
        rows = self.rows_at(positions, ["premise", "hypothesis", "label"])
        encoded = self.tokenizer(
            rows["premise"],
            rows["hypothesis"],
            truncation=True,
            max_length=self.max_tokens,
            padding="longest",
            return_tensors="pt",
        )
        return {**encoded, "labels": torch.tensor(rows["label"])}


class ImageExamples(ParquetExamples):
    """Images decoded and augmented in the worker, as uint8 ``[batch, 3, H, W]``."""

    def __init__(self, path, preprocess: dict, seed: int):
        super().__init__(path, "image")
        self.preprocess, self.seed = preprocess, seed
        self.cached_groups = 2

    def __call__(self, positions, epochs=None, train=True) -> dict:
        from torchvision.transforms.v2 import functional as F

        rows = self.rows_at(positions, ["example_id", "image", "label"])
        pixels = []
        for i, (example_id, data) in enumerate(zip(rows["example_id"], rows["image"])):
            image = F.pil_to_tensor(store.decode_image(data, f"{self.path}, example {example_id}"))
            if train and epochs is not None:
                torch.manual_seed(example_seed(self.seed, epochs[i], example_id))
            pixels.append(self.transform(image, train))
        return {
            "pixel_values": stack_images(pixels, self.path),
            "labels": torch.tensor(rows["label"]),
        }

    def transform(self, image: torch.Tensor, train: bool) -> torch.Tensor:
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as F

        crop, resize = self.preprocess.get("crop"), self.preprocess.get("resize")
        if train and crop:  # the ImageNet training recipe
            image = v2.RandomResizedCrop(crop, antialias=True)(image)
            return v2.RandomHorizontalFlip()(image)
        if resize:
            image = F.resize(image, resize, antialias=True)
        if crop:
            image = F.center_crop(image, crop)
        return image


def normalise(batch: dict, preprocess: dict | None) -> dict:
    """uint8 images scaled to [0, 1] and normalised by the model's mean and std (on the device
    the batch is on)."""
    if "pixel_values" in batch and preprocess is not None:
        from torchvision.transforms.v2 import functional as F

        pixels = batch["pixel_values"].float().div_(255)
        batch["pixel_values"] = F.normalize(pixels, preprocess["mean"], preprocess["std"])
    return batch


# --- batches ----------------------------------------------------------------------------------


class StepBatches(Dataset):
    """Item ``i``: the batch of step ``first + i`` (training)."""

    def __init__(
        self, examples, order: EpochOrder, batch_size: int, first: int, steps: int, total=None
    ):
        self.examples, self.order, self.batch_size = examples, order, batch_size
        self.first, self.steps, self.total = first, steps, total

    def __len__(self) -> int:
        return self.steps - self.first

    def __getitem__(self, i: int) -> dict:
        positions, epochs = self.order.positions(self.first + i, self.batch_size, self.total)
        return self.examples(positions, epochs, train=True)


class FixedBatches(Dataset):
    """Item ``i``: the examples at ``positions[i x batch : (i + 1) x batch]`` (evaluation)."""

    def __init__(self, examples, positions: np.ndarray, batch_size: int):
        self.examples, self.positions, self.batch_size = examples, positions, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch_size)

    def __getitem__(self, i: int) -> dict:
        part = self.positions[i * self.batch_size : (i + 1) * self.batch_size]
        return self.examples(part, None, train=False)


def window_groups(batch_size: int, row_group_rows: int) -> int:
    """Row groups per shuffling window: about two batches of rows."""
    return max(1, math.ceil(2 * batch_size / max(1, row_group_rows)))
