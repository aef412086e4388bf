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
bounded by ``readouts x chunk_rows x chunks_per_shard x width`` (and a queue of two batches)
whatever the number of rows. It runs in a thread of its own, beside the forward passes, and
writes the read-out points of a shard in parallel threads. Chunks are stored uncompressed by
default (activations do not compress: zstd stores 0.92 to 0.94 of the raw bytes at half the
speed), ``compression: zstd`` on request; every chunk carries a crc32c checksum either way.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from workflow_scripts.models.adapter import Readout
from workflow_scripts.output_cache import provenance
from workflow_scripts.stage import InputError

INDEX_ARRAYS = {"example_id": np.int64, "position": np.int32, "is_padding": np.bool_}


def layer_name(index: int) -> str:
    return f"layer-{index}"


COMPRESSORS = {"none": [], "zstd": [ZstdCodec(level=1)]}  # then a crc32c checksum, always


def write_raw_shard(array_dir: Path, index: int, buffer: np.ndarray, rows: int, chunk: int):
    """Shard ``index`` of an uncompressed array with Zarr's sharding codec (inner codecs bytes +
    crc32c, index codecs bytes + crc32c, index at the end), written as one file: the first
    ``rows`` rows of ``buffer`` (which holds a whole shard of rows), every inner chunk stored,
    the edge chunk padded with zeros and chunks past the end marked empty. Zarr reads it, and its
    checksums, like a shard it wrote; writing it directly skips Zarr's per-chunk pipeline.

    Each chunk is its C-order little-endian bytes and their crc32c; the index holds (offset,
    length) as little-endian uint64 per chunk, then its own crc32c."""
    chunks = len(buffer) // chunk
    offsets = np.full((chunks, 2), 2**64 - 1, "<u8")
    pieces, offset = [], 0
    for c in range(chunks):
        first = c * chunk
        if first >= rows:
            continue  # past the end of the array: empty
        data = buffer[first : first + chunk]
        if first + chunk > rows:
            data = data.copy()
            data[rows - first :] = 0  # the fill value
        data = np.ascontiguousarray(data, data.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
        checksum = np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()
        pieces += [data, checksum]
        offsets[c] = (offset, data.nbytes + 4)
        offset += data.nbytes + 4
    grid = (chunks,) if buffer.ndim == 1 else (chunks, 1)
    index_bytes = offsets.reshape(*grid, 2).tobytes()
    pieces += [index_bytes, np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()]
    key = array_dir / "c" / str(index) if buffer.ndim == 1 else array_dir / "c" / str(index) / "0"
    key.parent.mkdir(parents=True, exist_ok=True)
    with open(key, "wb") as handle:
        handle.writelines(pieces)


class ShardWriter:
    """Writes the rows of one extraction shard in order; call :meth:`append` per batch and
    :meth:`close` at the end (or :meth:`abort`). Rows go to ``path`` exactly as given.

    ``append`` hands a batch to a writer thread through a queue of ``depth`` batches and returns
    at once, so the next forward pass runs while this batch is buffered and written; a batch's
    arrays may still be on their way from the GPU (``ready``: a CUDA event the thread waits on).
    An error in the writer is raised by the next ``append`` or by ``close``."""

    def __init__(
        self,
        path: str | Path,
        readouts: list[Readout],
        rows: int,
        dtype: str,
        chunk_rows: int,
        chunks_per_shard: int,
        compression: str = "none",
        depth: int = 2,
    ):
        if rows <= 0:
            raise ValueError(f"{path}: nothing to write (0 rows)")
        if compression not in COMPRESSORS:
            raise ValueError(f"compression {compression!r}: choose one of {sorted(COMPRESSORS)}")
        self.path, self.rows, self.dtype = Path(path), rows, np.dtype(dtype)
        chunk = min(chunk_rows, rows)
        self.block = chunk * min(chunks_per_shard, math.ceil(rows / chunk))
        self.group = zarr.open_group(self.path, mode="w", zarr_format=3)
        self.compression, self.chunk = compression, chunk
        # every chunk written, even one of zeros, so that a missing file is always an error
        codecs = dict(
            compressors=[*COMPRESSORS[compression], Crc32cCodec()],
            config={"write_empty_chunks": True},
        )
        self.arrays, self.buffers, self.names = [], [], []
        for readout in readouts:
            self.names.append(layer_name(readout.index))
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
            self.names.append(name)
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
        self.announced = 0  # rows handed to append
        self.pool = ThreadPoolExecutor(max(1, min(len(self.arrays), os.cpu_count() or 1)))
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def append(
        self,
        streams: list,
        example_id: np.ndarray,
        position: np.ndarray,
        is_padding: np.ndarray,
        ready=None,
    ) -> None:
        """Queue a batch: one ``[rows, width]`` array (numpy, or a CPU tensor) per read-out and
        the rows' index arrays; ``ready``, if given, is waited on before the arrays are read."""
        self._raise()
        columns = [*streams, example_id, position, is_padding]
        n = len(example_id)
        if any(len(c) != n for c in columns):
            raise ValueError("every read-out and index array of a batch needs the same rows")
        if self.announced + n > self.rows:
            raise ValueError(f"{self.path}: more rows than the {self.rows} announced")
        self.announced += n
        while True:  # wait for room, but not for a writer that has died
            try:
                self.queue.put((columns, ready), timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None or self.error is not None:
                return
            try:
                columns, ready = item
                if ready is not None:
                    ready.synchronize()
                self._buffer([c.numpy() if hasattr(c, "numpy") else c for c in columns])
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                self.error = error
                return

    def _buffer(self, columns: list[np.ndarray]) -> None:
        n, offset = len(columns[-1]), 0
        while offset < n:
            if self.filled == 0 and n - offset >= self.block:  # a whole shard: no copy
                whole = [
                    np.asarray(c[offset : offset + self.block], b.dtype)  # a copy only to cast
                    for c, b in zip(columns, self.buffers)
                ]
                self._write(whole, self.block)
                offset += self.block
                continue
            take = min(n - offset, self.block - self.filled)
            for buffer, column in zip(self.buffers, columns):
                buffer[self.filled : self.filled + take] = column[offset : offset + take]
            self.filled += take
            offset += take
            if self.filled == self.block:
                self._flush()

    def _flush(self) -> None:
        if self.filled:
            self._write(self.buffers, self.filled)
            self.filled = 0

    def _write(self, sources: list[np.ndarray], rows: int) -> None:
        """The next shard of rows, from ``sources`` (whole-shard buffers or views of a batch)
        of which the first ``rows`` rows count, one read-out point per thread."""
        start, end = self.written, self.written + rows

        def write(name, array, source):
            if self.compression == "none":  # the shard's bytes, laid out as Zarr reads them
                write_raw_shard(self.path / name, start // self.block, source, rows, self.chunk)
            else:
                array[start:end] = source[:rows]

        jobs = zip(self.names, self.arrays, sources)
        for done in [self.pool.submit(write, *job) for job in jobs]:
            done.result()
        self.written = end

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"{self.path}: writing failed ({self.error})") from self.error

    def _stop(self) -> None:
        """Let the thread finish what is queued (or die), then stop it."""
        while self.thread.is_alive():
            try:
                self.queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self.thread.join()

    def close(self, attributes: dict) -> None:
        self._stop()
        self._raise()
        self._flush()
        self.pool.shutdown()
        if self.written != self.rows:
            raise ValueError(f"{self.path}: wrote {self.written} rows of {self.rows} announced")
        self.group.attrs.update(attributes)

    def abort(self) -> None:
        """Stop the writer thread and its pool after an error elsewhere, so that nothing writes
        into the shard while it is removed."""
        self.error = self.error or RuntimeError("aborted")
        while True:  # drop what is queued: it will not be written
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self._stop()
        self.pool.shutdown(wait=True, cancel_futures=True)


class ShardError(InputError):
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
    _check_files(group, Path(path))
    return group


def _check_files(group: zarr.Group, path: Path) -> None:
    """Every shard file of every array is there and not empty: the writer writes them all, and
    Zarr would read a missing one as zeros (its fill value) without a word."""
    for name, array in group.arrays():
        rows = array.shards[0] if array.shards else array.chunks[0]
        for index in range(math.ceil(array.shape[0] / rows)):
            key = Path(name, "c", str(index), *(["0"] if array.ndim == 2 else []))
            file = path / key
            if not file.is_file() or file.stat().st_size == 0:
                state = "is missing" if not file.exists() else "is empty"
                raise ShardError(
                    f"{path}: {key} {state}; a finished shard has every file, so this one was "
                    f"deleted or truncated{provenance(file)}"
                )


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
