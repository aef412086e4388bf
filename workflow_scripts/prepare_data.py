"""prepare_data: bring a dataset source into the stored Parquet layout, streaming.

Sources: ``builtin:<pairs|corpus|shapes>`` (generated from the seed, block by block),
``hf:<repo>[/<config>]:<split>`` (the datasets library's memory-mapped Arrow, read in batches),
``parquet:<path>`` (read in batches) and ``imagefolder:<path>`` (one folder per class, class names
sorted; files are read by worker processes). ``columns`` maps stored column names to source
column names; ``rows`` keeps a seeded random subset of that many rows (chosen from the source's
row count, without reading the rows it drops); ``image_resize`` shrinks images so their shorter
side has that many pixels.

Images are stored as the bytes that came (JPEG stays JPEG) unless ``image_resize`` shrinks them;
every image is decoded, in worker processes, to check it, and one that does not decode stops the
job naming its file or example. Rows keep the source's order, except image folders: their files
are stored in a seeded random order (``example_id`` is still the position in the sorted listing),
because training shuffles row groups, not rows, and a folder is sorted by class.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from workflow_scripts import sources
from workflow_scripts.data import builtin, store
from workflow_scripts.data.store import DatasetError, DatasetWriter
from workflow_scripts.parallel import ordered_map
from workflow_scripts.sources import dataset_kind, hub_dataset

log = logging.getLogger("prepare_data")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
BLOCK_ROWS = 1024  # rows read from the source at a time
IMAGE_BLOCK_ROWS = 64  # images handed to a worker at a time


@dataclass
class Source:
    """A source's row count, column names and label names, and a reader of its rows: ``read``
    yields frames of the rows at the given sorted positions (all rows with None), each with an
    ``example_id`` column where the source has none (the row's position)."""

    rows: int
    columns: list[str]
    label_names: list[str] | None
    read: object  # Callable[[np.ndarray | None], Iterator[pd.DataFrame]]


def prepare(spec: dict, out: str | Path, name: str = "dataset", workers: int = 1) -> int:
    """Read the source ``spec`` names, check it, and write ``out``; returns the number of rows."""
    parsed = sources.Source.parse(spec["source"])
    scheme, rest = parsed.scheme, parsed.location
    kind = dataset_kind(spec)
    seed = spec.get("seed", 0)
    readers = {
        "builtin": _builtin,
        "hf": _from_hub,
        "parquet": _from_parquet,
        "imagefolder": _from_imagefolder,
    }
    if scheme not in readers:
        raise DatasetError(
            f"dataset {name}: unknown source scheme {scheme!r}; allowed: "
            "builtin:, hf:, parquet:, imagefolder:"
        )
    source = readers[scheme](rest, spec, name, workers)
    columns = spec.get("columns", {})
    missing = [c for c in columns.values() if c not in source.columns]
    if missing:
        raise DatasetError(
            f"dataset {name}: columns {missing} named in 'columns' are not in "
            f"the source (has {source.columns})"
        )
    keep = _subsample(source.rows, spec.get("rows"), seed) if scheme != "builtin" else None
    rows = source.rows if keep is None else len(keep)
    shards = spec.get("shards", 1)
    if shards > rows:
        raise DatasetError(
            f"dataset {name}: {shards} shards for {rows} rows; shards must not exceed rows"
        )
    renames = {source_column: stored for stored, source_column in columns.items()}
    blocks = (frame.rename(columns=renames) for frame in source.read(keep))
    if kind == "image" and scheme != "imagefolder":  # folders are checked as they are read
        blocks = _checked_images(blocks, spec.get("image_resize"), name, workers)
    with DatasetWriter(out, kind, source.label_names, name) as writer:
        for frame in tqdm(
            blocks, desc=f"prepare {name}", unit="block", file=sys.stderr, mininterval=10
        ):
            writer.write(frame)
    log.info("wrote %s: %d rows of kind %s", out, writer.rows, kind)
    return writer.rows


def _subsample(count: int, rows: int | None, seed: int) -> np.ndarray | None:
    """Sorted positions of a seeded random subset of ``rows`` of ``count`` (None: all)."""
    if rows is None or rows >= count:
        return None
    return np.sort(np.random.default_rng(seed).choice(count, size=rows, replace=False))


def _with_positions(frame: pd.DataFrame, positions: np.ndarray) -> pd.DataFrame:
    if "example_id" not in frame:
        frame.insert(0, "example_id", positions.astype(np.int64))
    return frame


# --- images: checked (and resized) in worker processes ----------------------------------------


def _checked_images(blocks, resize: int | None, name: str, workers: int):
    """The blocks with every image decoded by the workers (and resized where asked); the rows
    stay here and only the images travel, resized ones back."""
    parts: deque[pd.DataFrame] = deque()

    def jobs():
        for frame in blocks:
            for start in range(0, len(frame), IMAGE_BLOCK_ROWS):
                part = frame.iloc[start : start + IMAGE_BLOCK_ROWS].reset_index(drop=True)
                parts.append(part)
                if "image" in part and "example_id" in part:
                    yield part["example_id"].tolist(), part["image"].tolist(), resize, name
                else:
                    yield None  # the writer names the missing column

    for images in ordered_map(_check_block, jobs(), workers):
        part = parts.popleft()
        if images is not None:
            part["image"] = images
        yield part


def _check_block(job) -> list[bytes] | None:
    if job is None:
        return None
    example_ids, images, resize, name = job
    if not all(isinstance(data, bytes) for data in images):
        return None  # not encoded images: the writer's check names the examples
    checked = [
        _checked(data, resize, f"dataset {name}, example {example_id}")
        for example_id, data in zip(example_ids, images)
    ]
    return checked if resize else None


def _checked(data: bytes, resize: int | None, where: str) -> bytes:
    """The image's bytes after decoding them in full; resized and re-encoded (JPEG stays JPEG,
    other formats become PNG) where ``resize`` asks for a shorter side smaller than it has."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # PIL raises several kinds for bad data
        raise DatasetError(f"{where}: image does not decode ({error})") from None
    if not resize or min(image.size) <= resize:
        return data
    scale = resize / min(image.size)
    jpeg = image.format == "JPEG"
    image = image.convert("RGB").resize(
        (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
    )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95) if jpeg else image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- sources ------------------------------------------------------------------------------------


def _builtin(rest: str, spec: dict, name: str, workers: int) -> Source:
    if rest not in builtin.DEFAULT_ROWS:
        raise DatasetError(
            f"dataset {name}: unknown built-in dataset {rest!r}; choose one of "
            f"{sorted(builtin.DEFAULT_ROWS)}"
        )
    rows = spec.get("rows") or builtin.DEFAULT_ROWS[rest]
    columns = store.COLUMNS[dataset_kind(spec)]

    def read(keep):
        return builtin.blocks(rest, rows, spec.get("seed", 0))

    return Source(rows, columns, builtin.label_names(rest), read)


def _from_hub(rest: str, spec: dict, name: str, workers: int) -> Source:
    import datasets

    repo, subset, split = hub_dataset(rest)
    data = datasets.load_dataset(repo, subset, split=split)  # memory-mapped Arrow on disk
    label_column = spec.get("columns", {}).get("label", "label")  # the source's label column
    label = data.features.get(label_column)
    names = list(label.names) if label is not None and hasattr(label, "names") else None
    images = [c for c, f in data.features.items() if isinstance(f, datasets.Image)]
    valid = None
    if label_column in data.column_names:  # hub test splits mark unlabelled rows -1: dropped
        labels = data.data.column(label_column).to_numpy()
        if (labels < 0).any():
            valid = np.flatnonzero(labels >= 0)
    rows = len(data) if valid is None else len(valid)

    def read(keep):
        chosen = valid if keep is None else (keep if valid is None else valid[keep])
        selected = data if chosen is None else data.select(chosen)
        positions = np.arange(rows) if keep is None else keep
        offset = 0
        for table in selected.with_format("arrow").iter(batch_size=BLOCK_ROWS):
            frame = table.to_pandas()
            for column in images:  # datasets stores images as {"bytes", "path"}
                frame[column] = [_image_bytes(v, f"dataset {name}") for v in frame[column]]
            yield _with_positions(frame, positions[offset : offset + len(frame)])
            offset += len(frame)

    return Source(rows, list(data.column_names), names, read)


def _image_bytes(value, where: str) -> bytes | None:
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"]).read_bytes()
        raise DatasetError(f"{where}: an image with neither bytes nor a path")
    return value


def _from_parquet(path: str, spec: dict, name: str, workers: int) -> Source:
    import pyarrow.parquet as pq

    if Path(path).is_dir():
        raise DatasetError(f"dataset {name}: parquet source {path!r} is a folder, not a file")
    if not Path(path).is_file():
        raise DatasetError(f"dataset {name}: parquet file {path!r} does not exist")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:
        raise DatasetError(
            f"dataset {name}: {path} is not a readable Parquet file ({error})"
        ) from None
    metadata = parquet.schema_arrow.metadata or {}
    names = json.loads(metadata[b"label_names"]) if b"label_names" in metadata else None

    def read(keep):
        offset = 0
        for batch in parquet.iter_batches(batch_size=BLOCK_ROWS):
            stop = offset + len(batch)
            if keep is None:
                positions = np.arange(offset, stop)
            else:
                positions = keep[np.searchsorted(keep, offset) : np.searchsorted(keep, stop)]
                batch = batch.take(positions - offset)
            offset = stop
            if len(positions):
                frame = batch.to_pandas()
                for column in frame.columns:  # Hugging Face exports images as {bytes, path}
                    if len(frame) and isinstance(frame[column].iloc[0], dict):
                        frame[column] = [_image_bytes(v, f"dataset {name}") for v in frame[column]]
                yield _with_positions(frame, positions)

    return Source(parquet.metadata.num_rows, parquet.schema_arrow.names, names, read)


def _from_imagefolder(path: str, spec: dict, name: str, workers: int) -> Source:
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"dataset {name}: image folder {path!r} does not exist")
    classes = sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise DatasetError(f"dataset {name}: image folder {path!r} has no class folders")
    # the listing (paths below the class folder, about 30 bytes a file) is what a folder's order
    # comes from; an image in a sub-folder of a class folder is of that class (as torchvision's
    # ImageFolder reads it)
    listing = [_images_below(root / cls) for cls in classes]
    starts = np.concatenate([[0], np.cumsum([len(files) for files in listing])])
    rows = int(starts[-1])
    if rows == 0:
        raise DatasetError(f"dataset {name}: image folder {path!r} holds no images")

    def read(keep):
        positions = np.arange(rows) if keep is None else keep
        order = np.random.default_rng(spec.get("seed", 0)).permutation(positions)

        def jobs():
            for start in range(0, len(order), IMAGE_BLOCK_ROWS):
                block = order[start : start + IMAGE_BLOCK_ROWS]
                labels = np.searchsorted(starts, block, side="right") - 1
                files = [
                    str(root / classes[c] / listing[c][p - starts[c]])
                    for c, p in zip(labels, block)
                ]
                yield block, labels, files, spec.get("image_resize"), f"dataset {name}"

        yield from ordered_map(_read_files, jobs(), workers)

    return Source(rows, ["image", "label"], classes, read)


def _images_below(folder: Path) -> list[str]:
    """The image files anywhere below ``folder``, as sorted paths relative to it."""
    found = []
    for parent, subfolders, files in os.walk(folder):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        below = Path(parent).relative_to(folder)
        found += [str(below / f) for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _read_files(job) -> pd.DataFrame:
    positions, labels, files, resize, where = job
    images = [_checked(Path(file).read_bytes(), resize, f"{where}, file {file}") for file in files]
    return pd.DataFrame(
        {"example_id": positions.astype(np.int64), "image": images, "label": labels}
    )


def run(spec: dict, name: str, out: str, threads: int = 1) -> None:
    """The prepare_data stage: a dataset entry's rows as the stored Parquet file."""
    prepare(spec, Path(out), name, threads)
