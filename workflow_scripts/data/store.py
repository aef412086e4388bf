"""The stored dataset: one Parquet file per dataset, written and read in bounded row groups.

Columns by kind (``example_id`` is a stable integer id: the row's position in its source):
pairs ``example_id, premise, hypothesis, label``; text ``example_id, text``; image
``example_id, image (encoded bytes as they came: JPEG stays JPEG), label``. The schema metadata
holds the kind, the rows per row group and, for labelled kinds, the label names as JSON.

:class:`DatasetWriter` takes the rows block by block, checks each block and writes whole row
groups; :class:`DatasetFile` reads a range of rows, or batches of it, from only the row groups
that hold them. Neither ever holds more than a row group and a block.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from workflow_scripts.atomic import written
from workflow_scripts.output_cache import provenance
from workflow_scripts.stage import InputError

COLUMNS = {
    "pairs": ["example_id", "premise", "hypothesis", "label"],
    "text": ["example_id", "text"],
    "image": ["example_id", "image", "label"],
}
TYPES = {
    "example_id": pa.int64(),
    "premise": pa.string(),
    "hypothesis": pa.string(),
    "text": pa.string(),
    "image": pa.binary(),
    "label": pa.int64(),
}
# rows per row group: a few MB of text, or about 14 MB of ImageNet JPEGs; the unit every reader
# reads, so a reader's memory is a row group, whatever the dataset's size
ROW_GROUP_ROWS = {"pairs": 2048, "text": 1024, "image": 128}


class DatasetError(InputError):
    """A dataset that does not have the stored layout, or holds rows that cannot be used."""


def schema(kind: str, label_names: list[str] | None, row_group_rows: int) -> pa.Schema:
    metadata = {b"kind": kind.encode(), b"row_group_rows": str(row_group_rows).encode()}
    if label_names is not None:
        metadata[b"label_names"] = json.dumps(label_names).encode()
    return pa.schema([(c, TYPES[c]) for c in COLUMNS[kind]], metadata=metadata)


def check(frame: pd.DataFrame, kind: str, label_names: list[str] | None, name: str) -> pd.DataFrame:
    """A block of rows with exactly the kind's columns, after checking them (that images decode
    is checked apart, in prepare_data's workers); raises DatasetError naming the examples at
    fault."""
    expected = COLUMNS[kind]
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"dataset {name}: missing column(s) {missing} for kind {kind!r} "
            f"(has {list(frame.columns)}; a {kind} dataset needs {expected})"
        )
    frame = frame[expected].reset_index(drop=True)
    for column in ("premise", "hypothesis", "text"):
        if column in frame:
            bad = ~frame[column].map(lambda v: isinstance(v, str))
            if bad.any():
                raise DatasetError(
                    f"dataset {name}: column {column!r} is not text in example(s) "
                    f"{frame.loc[bad, 'example_id'].head(5).tolist()}"
                )
    if "image" in frame:
        bad = ~frame["image"].map(lambda v: isinstance(v, bytes))
        if bad.any():
            raise DatasetError(
                f"dataset {name}: column 'image' holds no encoded image in example(s) "
                f"{frame.loc[bad, 'example_id'].head(5).tolist()}"
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
    return frame


def decode_image(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # PIL raises several kinds for bad data
        raise DatasetError(f"{where}: image does not decode ({error})") from None
    return image.convert("RGB")


class DatasetWriter:
    """Writes a dataset block by block into whole row groups, atomically: the file appears under
    its name only when :meth:`close` succeeds; an error or an interruption leaves nothing.

    Use as a context manager; ``write`` takes pandas frames of any length."""

    def __init__(self, path, kind: str, label_names: list[str] | None, name: str = "dataset"):
        self.kind, self.label_names, self.name = kind, label_names, name
        self.group_rows = ROW_GROUP_ROWS[kind]
        self.rows = 0
        self._ids: list[np.ndarray] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(written(path))
        self._writer = pq.ParquetWriter(
            tmp,
            schema(kind, label_names, self.group_rows),
            compression={c: "none" if c == "image" else "zstd" for c in COLUMNS[kind]},
            use_dictionary=[c for c in COLUMNS[kind] if c != "image"],
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._writer.close()
            self._stack.__exit__(*exc)  # removes the temporary file
        return False

    def write(self, frame: pd.DataFrame) -> None:
        frame = check(frame, self.kind, self.label_names, self.name)
        if not len(frame):
            return
        self._ids.append(frame["example_id"].to_numpy(np.int64))
        table = pa.Table.from_pandas(frame, preserve_index=False)
        self._pending.append(table.cast(self._writer.schema.remove_metadata()))
        self._pending_rows += len(frame)
        self.rows += len(frame)
        while self._pending_rows >= self.group_rows:
            self._flush(self.group_rows)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        self._writer.write_table(table.slice(0, rows), row_group_size=rows)
        rest = table.slice(rows)
        self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)
        if self.rows == 0:
            raise DatasetError(f"dataset {self.name}: no rows")
        ids = np.concatenate(self._ids)  # 8 bytes a row: the one thing kept for the whole set
        if (np.diff(ids) <= 0).any() and len(np.unique(ids)) < len(ids):
            values, counts = np.unique(ids, return_counts=True)
            raise DatasetError(
                f"dataset {self.name}: example_id values repeat: {values[counts > 1][:5].tolist()}"
            )
        self._writer.close()
        self._stack.close()  # publishes the file


class DatasetFile:
    """A stored dataset, opened for reading rows by position.

    ``kind``, ``label_names``, ``rows`` and ``row_group_rows`` come from the footer alone."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = pq.ParquetFile(self.path)
        except (OSError, pa.ArrowInvalid) as error:
            raise DatasetError(
                f"{path}: not a readable Parquet file ({error}){provenance(self.path)}"
            ) from None
        metadata = self._file.schema_arrow.metadata or {}
        if b"kind" not in metadata:
            raise DatasetError(
                f"{path}: no 'kind' in the schema metadata; prepare datasets with the "
                "prepare_data rule"
            )
        self.kind = metadata[b"kind"].decode()
        self.label_names = (
            json.loads(metadata[b"label_names"]) if b"label_names" in metadata else None
        )
        missing = [c for c in COLUMNS[self.kind] if c not in self._file.schema_arrow.names]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing} for kind {self.kind!r}")
        groups = [self._file.metadata.row_group(i).num_rows for i in range(self.groups)]
        self.group_starts = np.concatenate([[0], np.cumsum(groups, dtype=np.int64)])
        self.rows = int(self.group_starts[-1])
        self.row_group_rows = int(metadata.get(b"row_group_rows", max(groups, default=0)))

    @property
    def groups(self) -> int:
        return self._file.metadata.num_row_groups

    def group_of(self, positions: np.ndarray) -> np.ndarray:
        """The row group holding each row position."""
        return np.searchsorted(self.group_starts, positions, side="right") - 1

    def read_group(self, group: int, columns: list[str] | None = None) -> pa.Table:
        try:
            return self._file.read_row_group(group, columns=columns)
        except (OSError, pa.ArrowException) as error:  # a corrupted page: decompression, checks
            raise self._corrupted(f"row group {group}", error) from None

    def column(self, name: str) -> np.ndarray:
        """One small column (``example_id``, ``label``) for every row."""
        try:
            return self._file.read(columns=[name]).column(name).to_numpy()
        except (OSError, pa.ArrowException) as error:
            raise self._corrupted(f"column {name!r}", error) from None

    def _corrupted(self, part: str, error: Exception) -> DatasetError:
        return DatasetError(
            f"{self.path}: {part} does not read ({str(error).splitlines()[0]}): the file is "
            f"corrupted{provenance(self.path)}"
        )

    def read(self, start: int = 0, stop: int | None = None, columns=None) -> pd.DataFrame:
        """Rows [start, stop) as a frame, read from the row groups that hold them."""
        stop = self.rows if stop is None else stop
        pieces = list(self.batches(start, stop, max(1, stop - start), columns))
        if not pieces:
            return self.read_group(0, columns).slice(0, 0).to_pandas()
        return pieces[0]

    def batches(
        self, start: int, stop: int, batch_rows: int, columns: list[str] | None = None
    ) -> Iterator[pd.DataFrame]:
        """Rows [start, stop) in frames of ``batch_rows``, one row group in memory at a time."""
        if start >= stop:
            return
        pending: list[pa.Table] = []
        pending_rows = 0
        first, last = self.group_of(np.array([start, stop - 1]))
        for group in range(int(first), int(last) + 1):
            table = self.read_group(group, columns)
            lo = max(start - int(self.group_starts[group]), 0)
            hi = min(stop - int(self.group_starts[group]), len(table))
            pending.append(table.slice(lo, hi - lo))
            pending_rows += hi - lo
            while pending_rows >= batch_rows:
                table = pa.concat_tables(pending)
                yield table.slice(0, batch_rows).to_pandas()
                rest = table.slice(batch_rows)
                pending, pending_rows = [rest], len(rest)
        if pending_rows:
            yield pa.concat_tables(pending).to_pandas()

    def take(self, positions: np.ndarray, columns: list[str] | None = None) -> pd.DataFrame:
        """The rows at ``positions``, in that order, reading each row group they touch once."""
        positions = np.asarray(positions, np.int64)
        if len(positions) == 0:
            return self.read_group(0, columns).slice(0, 0).to_pandas()
        groups = self.group_of(positions)
        parts, order = [], []
        for group in np.unique(groups):
            chosen = np.flatnonzero(groups == group)
            table = self.read_group(int(group), columns)
            parts.append(table.take(positions[chosen] - self.group_starts[group]))
            order.append(chosen)
        table = pa.concat_tables(parts).take(np.argsort(np.concatenate(order), kind="stable"))
        return table.to_pandas()

    def find(self, example_ids, columns: list[str] | None = None) -> pd.DataFrame:
        """The rows with these example ids (in file order), read one row group at a time."""
        wanted = pa.array(np.asarray(list(example_ids), np.int64))
        parts = []
        for group in range(self.groups):
            table = self.read_group(group, columns)
            parts.append(table.filter(pc.is_in(table["example_id"], wanted)))
        return pa.concat_tables(parts).to_pandas()


def write(frame: pd.DataFrame, path: str | Path, kind: str, label_names: list[str] | None) -> None:
    """Write a whole frame (small datasets made in code: tests, benchmarks) atomically."""
    with DatasetWriter(path, kind, label_names) as writer:
        writer.write(frame)


def read(path: str | Path) -> tuple[pd.DataFrame, str, list[str] | None]:
    """A whole small dataset as a frame, its kind and label names (for tests and notebooks; the
    workflow's stages read rows by position through :class:`DatasetFile`)."""
    dataset = DatasetFile(path)
    return dataset.read(), dataset.kind, dataset.label_names
