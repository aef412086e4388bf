"""The stored dataset: one Parquet file per dataset.

Columns by kind (``example_id`` is a stable integer id: the row's position in its source):
pairs ``example_id, premise, hypothesis, label``; text ``example_id, text``; image
``example_id, image (PNG bytes), label``. The schema metadata holds the kind and, for labelled
kinds, the label names as JSON.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from workflow_scripts.atomic import written

COLUMNS = {
    "pairs": ["example_id", "premise", "hypothesis", "label"],
    "text": ["example_id", "text"],
    "image": ["example_id", "image", "label"],
}


class DatasetError(ValueError):
    """A dataset that does not have the stored layout, or holds rows that cannot be used."""


def check(frame: pd.DataFrame, kind: str, label_names: list[str] | None, name: str) -> pd.DataFrame:
    """The frame with exactly the kind's columns, after checking them; raises DatasetError."""
    expected = COLUMNS[kind]
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"dataset {name}: missing column(s) {missing} for kind {kind!r} "
            f"(has {list(frame.columns)}; a {kind} dataset needs {expected})"
        )
    frame = frame[expected].reset_index(drop=True)
    if len(frame) == 0:
        raise DatasetError(f"dataset {name}: no rows")
    if frame["example_id"].duplicated().any():
        raise DatasetError(f"dataset {name}: example_id values repeat")
    for column in ("premise", "hypothesis", "text"):
        if column in frame and not frame[column].map(lambda v: isinstance(v, str)).all():
            bad = frame.loc[~frame[column].map(lambda v: isinstance(v, str)), "example_id"]
            raise DatasetError(
                f"dataset {name}: column {column!r} is not text in example(s) "
                f"{bad.head(5).tolist()}"
            )
    if "label" in frame:
        labels = frame["label"].to_numpy()
        if not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"dataset {name}: labels must be integers, got {labels.dtype}")
        if label_names is not None:
            outside = frame.loc[(labels < 0) | (labels >= len(label_names)), "example_id"]
            if len(outside):
                raise DatasetError(
                    f"dataset {name}: label(s) outside 0..{len(label_names) - 1} "
                    f"({label_names}) in example(s) {outside.head(5).tolist()}"
                )
    if kind == "image":
        for example_id, data in zip(frame["example_id"], frame["image"]):
            decode_image(data, f"dataset {name}, example {example_id}")
    return frame


def decode_image(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # PIL raises several kinds for bad data
        raise DatasetError(f"{where}: image does not decode ({error})") from None
    return image.convert("RGB")


def write(frame: pd.DataFrame, path: str | Path, kind: str, label_names: list[str] | None) -> None:
    """Write the Parquet file atomically (temporary name, then rename)."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = {b"kind": kind.encode()}
    if label_names is not None:
        metadata[b"label_names"] = json.dumps(label_names).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with written(path) as tmp:
        pq.write_table(table, tmp)


def read(path: str | Path) -> tuple[pd.DataFrame, str, list[str] | None]:
    """The frame, its kind and its label names; raises DatasetError if not in the layout."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise DatasetError(f"{path}: not a readable Parquet file ({error})") from None
    metadata = table.schema.metadata or {}
    if b"kind" not in metadata:
        raise DatasetError(
            f"{path}: no 'kind' in the schema metadata; prepare datasets with the prepare_data rule"
        )
    kind = metadata[b"kind"].decode()
    names = json.loads(metadata[b"label_names"]) if b"label_names" in metadata else None
    frame = table.to_pandas()
    missing = [c for c in COLUMNS[kind] if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing} for kind {kind!r}")
    return frame, kind, names
