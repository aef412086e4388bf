"""The activation store: one Zarr v3 group per extraction shard.

Arrays:
  ``layer-{k}``  ``[rows, width]`` stream at read-out point k (float16 by default), chunked by rows
                 and stored with the sharding codec (``chunks_per_shard`` chunks per file);
                 every chunk carries a crc32c checksum, so a corrupted chunk fails to read.
  ``example_id`` ``[rows]`` int64, the dataset example each row comes from;
  ``position``   ``[rows]`` int32, the token position (0 for images);
  ``is_padding`` ``[rows]`` bool, true for rows at padding tokens.
Group attributes: ``readouts`` (index, stage, block, name, width), ``pooling``, ``dtype``,
``rows``, the shard's place in the dataset, the extraction options and ``digests`` of the model,
dataset and code that produced it.

The writer buffers one Zarr shard of rows per read-out point and writes whole shards, so memory is
bounded by ``readouts x chunk_rows x chunks_per_shard x width`` whatever the number of rows. The
read-out points of a shard are written in parallel threads; on a GPU the writer, not the model,
sets the pace, and threads lift it only by a fifth (Zarr's write path itself is the limit, not
zstd: see the README's GPU measurements).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from workflow_scripts.models.adapter import Readout
from workflow_scripts.output_cache import provenance

INDEX_ARRAYS = {"example_id": np.int64, "position": np.int32, "is_padding": np.bool_}


def layer_name(index: int) -> str:
    return f"layer-{index}"


class ShardWriter:
    """Writes the rows of one extraction shard in order; call :meth:`append` per batch and
    :meth:`close` at the end. Rows go to ``path`` exactly as given (no reordering)."""

    def __init__(
        self,
        path: str | Path,
        readouts: list[Readout],
        rows: int,
        dtype: str,
        chunk_rows: int,
        chunks_per_shard: int,
    ):
        if rows <= 0:
            raise ValueError(f"{path}: nothing to write (0 rows)")
        self.path, self.rows, self.dtype = Path(path), rows, np.dtype(dtype)
        chunk = min(chunk_rows, rows)
        self.block = chunk * min(chunks_per_shard, math.ceil(rows / chunk))
        self.group = zarr.open_group(self.path, mode="w", zarr_format=3)
        codecs = dict(compressors=[ZstdCodec(level=1), Crc32cCodec()])
        self.arrays, self.buffers = [], []
        for readout in readouts:
            self.arrays.append(
                self.group.create_array(
                    layer_name(readout.index),
                    shape=(rows, readout.width),
                    dtype=self.dtype,
                    chunks=(chunk, readout.width),
                    shards=(self.block, readout.width),
                    **codecs,
                )
            )
            self.buffers.append(np.empty((self.block, readout.width), self.dtype))
        for name, index_dtype in INDEX_ARRAYS.items():
            self.arrays.append(
                self.group.create_array(
                    name,
                    shape=(rows,),
                    dtype=index_dtype,
                    chunks=(chunk,),
                    shards=(self.block,),
                    **codecs,
                )
            )
            self.buffers.append(np.empty((self.block,), index_dtype))
        self.written = 0  # rows already in the store
        self.filled = 0  # rows waiting in the buffers
        self.pool = ThreadPoolExecutor(max(1, min(len(self.arrays), os.cpu_count() or 1)))

    def append(
        self,
        streams: list[np.ndarray],
        example_id: np.ndarray,
        position: np.ndarray,
        is_padding: np.ndarray,
    ) -> None:
        columns = [*streams, example_id, position, is_padding]
        n = len(example_id)
        if any(len(c) != n for c in columns):
            raise ValueError("every read-out and index array of a batch needs the same rows")
        if self.written + self.filled + n > self.rows:
            raise ValueError(f"{self.path}: more rows than the {self.rows} announced")
        offset = 0
        while offset < n:
            take = min(n - offset, self.block - self.filled)
            for buffer, column in zip(self.buffers, columns):
                buffer[self.filled : self.filled + take] = column[offset : offset + take]
            self.filled += take
            offset += take
            if self.filled == self.block:
                self._flush()

    def _flush(self) -> None:
        if self.filled == 0:
            return
        start, end = self.written, self.written + self.filled

        def write(array, buffer):
            array[start:end] = buffer[: end - start]

        for done in [self.pool.submit(write, a, b) for a, b in zip(self.arrays, self.buffers)]:
            done.result()
        self.written, self.filled = end, 0

    def close(self, attributes: dict) -> None:
        self._flush()
        self.pool.shutdown()
        if self.written != self.rows:
            raise ValueError(f"{self.path}: wrote {self.written} rows of {self.rows} announced")
        self.group.attrs.update(attributes)


class ShardError(ValueError):
    """A shard that cannot be used: unfinished, or corrupted on disk."""


def open_shard(path: str | Path) -> zarr.Group:
    """A finished shard, read-only."""
    try:
        group = zarr.open_group(Path(path), mode="r", zarr_format=3)
        finished = "readouts" in group.attrs
    except (OSError, ValueError) as error:  # no group there, or its metadata does not parse
        raise ShardError(
            f"{path}: not a readable activation shard ({error}){provenance(path)}"
        ) from None
    if not finished:
        raise ShardError(f"{path}: not a finished activation shard (no read-out attributes)")
    return group


def read_rows(group: zarr.Group, name: str, start: int, stop: int, shard: str | Path) -> np.ndarray:
    """Rows ``start:stop`` of array ``name`` of a shard. A chunk whose crc32c checksum or zstd
    frame does not match its bytes raises ShardError naming the shard (and the output cache
    entry it came from): a corrupted chunk is refused, never used."""
    try:
        return group[name][start:stop]
    except (ValueError, RuntimeError, OSError) as error:
        raise ShardError(
            f"{shard}: {name} rows {start}:{stop} are corrupted on disk ({error})"
            f"{provenance(Path(shard, name))}"
        ) from None
