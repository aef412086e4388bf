"""The activation store: one Zarr v3 group per extraction shard.

Arrays:
  ``layer-{k}``  ``[rows, width]`` stream at read-out point k (float16 by default), chunked by rows
                 and stored with the sharding codec (``chunks_per_shard`` chunks per file);
                 every chunk carries a crc32c checksum, so a corrupted chunk fails to read.
                 Its attribute ``dtype`` is the storage dtype (:data:`STORAGE_DTYPES`): float16
                 and float32 are stored as such; bfloat16, which Zarr does not have, as its bit
                 patterns in uint16 (the high half of a float32), decoded on read.
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

This module owns the layout: it writes shards (:class:`ShardWriter`, :func:`write_raw_shard`) and
reads one shard's rows back (:func:`open_shard`, :func:`read_rows_direct`, and the reference
:func:`read_rows` through Zarr). An uncompressed array is read straight from its files as
:func:`write_raw_shard` lays them out, every checksum verified. Everything that reads a set of
shards goes through :mod:`workflow_scripts.stream`, which is built on these.

Nothing is stored that the storage dtype cannot hold: the writer checks every batch, before any
of it is buffered, for rows that are not finite in the stream itself or not after the cast, and
stops with :class:`StreamOverflowError` naming the read-out point, the example and the setting
to change.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from workflow_scripts.models.adapter import Readout
from workflow_scripts.output_cache import provenance
from workflow_scripts.stage import InputError

INDEX_ARRAYS = {"example_id": np.int64, "position": np.int32, "is_padding": np.bool_}

# the storage dtypes of the stream (``extract.dtype``) and the dtype of their Zarr arrays:
# bfloat16 is stored as its bit patterns
STORAGE_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "float32": np.dtype(np.float32),
}
# the largest finite value of each
STORAGE_MAX = {
    "float16": float(np.finfo(np.float16).max),  # 65504
    "bfloat16": float(torch.finfo(torch.bfloat16).max),  # 3.39e38
    "float32": float(np.finfo(np.float32).max),  # 3.40e38
}
# the smallest magnitude that a cast to each rounds to inf: half an ulp past its largest value
# (ties go to the even significand: inf)
ROUNDS_TO_INF = {
    "float16": 65520.0,
    "bfloat16": (2 - 2**-8) * 2.0**127,
    "float32": (2 - 2**-24) * 2.0**127,
}
# casts that keep every finite value finite: (from, to storage dtype)
_KEEPS_FINITE = {
    (torch.float16, "float16"),
    (torch.float16, "bfloat16"),
    (torch.float16, "float32"),
    (torch.bfloat16, "bfloat16"),
    (torch.bfloat16, "float32"),
    (torch.float32, "float32"),
}


def storage_dtype(name) -> str:
    """The name of storage dtype ``name`` (a name, numpy dtype or type), checked."""
    name = "bfloat16" if str(name) == "bfloat16" else np.dtype(name).name
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {name!r}: choose one of {', '.join(STORAGE_DTYPES)}")
    return name


def to_storage(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """``x`` (any float dtype, on any device) as stored in storage dtype ``dtype``: float16 and
    float32 by torch's cast (round to nearest even; past float16's range is inf); bfloat16 by
    torch's cast too, its bit patterns as int16 (torch's uint16 has few kernels; the writer
    reads them as uint16)."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16)
    return x.to(getattr(torch, dtype))


def to_storage_checked(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x`` ([rows, width]) as stored (:func:`to_storage`), and per row whether it is
    finite in ``x`` and after the cast ([2, rows] bool): computed where ``x`` is, without a
    sync, for the writer to check (:meth:`ShardWriter.append`'s ``finite``). Both come from
    each row's largest and smallest value (NaN propagates through them), one cheap reduction
    each, no pass over the cast: a finite value becomes inf in the cast exactly when its
    magnitude reaches :data:`ROUNDS_TO_INF` (round to nearest even)."""
    stored = to_storage(x, dtype)
    high, low = x.amax(dim=1), x.amin(dim=1)
    source = torch.isfinite(high) & torch.isfinite(low)
    if (x.dtype, dtype) in _KEEPS_FINITE:
        after = source
    else:  # a comparison with NaN is false
        limit = ROUNDS_TO_INF[dtype]
        after = (high.to(torch.float64) < limit) & (low.to(torch.float64) > -limit)
    return stored, torch.stack((source, after))


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """Host rows ``x`` (numpy, any float dtype) as stored in storage dtype ``dtype``, the same
    as :func:`to_storage` gives (torch's rounding)."""
    if dtype != "bfloat16":
        with np.errstate(over="ignore"):  # past float16's range is inf, as in torch
            return np.asarray(x, STORAGE_DTYPES[dtype])
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    return to_storage(tensor, dtype).numpy().view(np.uint16)


def decode(x: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows of storage dtype ``dtype`` as float values: float16 and float32 as they are;
    bfloat16's bit patterns (uint16) as float32, exactly (the bits become the high half)."""
    if dtype != "bfloat16":
        return x
    if x.dtype != np.uint16:
        raise ValueError(f"bfloat16 rows are stored as uint16, not {x.dtype}")
    out = np.empty(x.shape, np.uint32)
    np.left_shift(x, 16, out=out, dtype=np.uint32)  # the high half of a float32, low half 0
    return out.view(np.float32)


def stored_dtype(array: zarr.Array) -> str:
    """The storage dtype of an array of a shard: its ``dtype`` attribute (layer arrays), else
    its Zarr dtype (index arrays, and layer arrays of shards written before the attribute)."""
    dtype = array.attrs.get("dtype")
    if dtype is None:
        return np.dtype(array.dtype).name
    if dtype not in STORAGE_DTYPES or np.dtype(array.dtype) != STORAGE_DTYPES[dtype]:
        raise ShardError(f"{array.name}: stored as {array.dtype}, but its attributes say {dtype}")
    return dtype


def _host(column) -> np.ndarray:
    """A column handed to the writer (numpy, or a CPU tensor) as numpy; a bfloat16 tensor as
    its bit patterns (int16)."""
    if isinstance(column, torch.Tensor):
        if column.dtype == torch.bfloat16:
            column = column.view(torch.int16)
        return column.numpy()
    return np.asarray(column)


class StreamOverflowError(InputError):
    """A value of the stream that the storage dtype cannot hold (NaN or inf, or past its
    range): never stored; the message names the read-out point, the row and what to change."""


@dataclasses.dataclass(frozen=True)
class StreamSource:
    """Where the rows of a shard come from, for the message of a value that cannot be stored:
    the model's config name, the dtype it runs in, the autocast dtype of its forward (None:
    none), and whether rows are token positions (text) or examples (images)."""

    model: str = "<name>"
    model_dtype: str | None = None
    autocast: str | None = None
    tokens: bool = True


def overflow_message(
    readout: Readout,
    example_id: int,
    position: int | None,
    padding: bool,
    in_source: bool,
    dtype: str,
    source: StreamSource,
) -> str:
    """Why a row cannot be stored, and what to change: ``in_source``: the model's forward
    itself gave NaN or inf; else a finite value is past the range of storage dtype ``dtype``."""
    where = f"read-out {readout.index} ({readout.name}), example {example_id}"
    if position is not None:
        where += f", token position {position}" + (" (padding)" if padding else "")
    if in_source:
        steps = []
        if source.model_dtype != "float32":
            steps.append(f"models.{source.model}.dtype: float32")
        if source.autocast is not None:
            steps.append(f"extract.autocast: null (the forward ran under {source.autocast})")
        if steps:
            advice = f"run the model in a wider dtype: set {' and '.join(steps)} in the config"
        else:
            advice = (
                f"it runs in float32 already (models.{source.model}.dtype) without autocast, "
                "so no wider dtype helps: check its weights and inputs"
            )
        return (
            f"{where}: the model's own forward gave NaN or inf (before any cast to {dtype}), "
            f"which is never stored; {advice}. Nothing was stored"
        )
    if dtype == "float16":
        advice = (
            "set extract.dtype: bfloat16 (float16's bytes with float32's range) or "
            "extract.dtype: float32 in the config"
        )
    elif dtype == "bfloat16":
        advice = "set extract.dtype: float32 in the config"
    else:
        advice = "no storage dtype is wider"
    return (
        f"{where}: a finite value past {dtype}'s range (±{STORAGE_MAX[dtype]:.5g}) would be "
        f"stored as inf; {advice}. Nothing was stored"
    )


def layer_name(index: int) -> str:
    return f"layer-{index}"


COMPRESSORS = {"none": [], "zstd": [ZstdCodec(level=1)]}  # then a crc32c checksum, always
NOT_STORED = 2**64 - 1  # an index entry's offset and length for a chunk not written


def write_raw_shard(array_dir: Path, index: int, buffer: np.ndarray, rows: int, chunk: int):
    """Shard ``index`` of an uncompressed array with Zarr's sharding codec (inner codecs bytes +
    crc32c, index codecs bytes + crc32c, index at the end), written as one file: the first
    ``rows`` rows of ``buffer`` (which holds a whole shard of rows), every inner chunk stored,
    the edge chunk padded with zeros and chunks past the end marked empty. Zarr reads it, and its
    checksums, like a shard it wrote; writing it directly skips Zarr's per-chunk pipeline.

    Each chunk is its C-order little-endian bytes and their crc32c; the index holds (offset,
    length) as little-endian uint64 per chunk, then its own crc32c."""
    chunks = len(buffer) // chunk
    offsets = np.full((chunks, 2), NOT_STORED, "<u8")
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

    ``dtype``: the storage dtype of the read-out points (:data:`STORAGE_DTYPES`), recorded as
    each layer array's ``dtype`` attribute and the group's (unless ``close`` is given one).

    ``append`` hands a batch to a writer thread through a queue of ``depth`` batches and returns
    at once, so the next forward pass runs while this batch is buffered and written; a batch's
    arrays may still be on their way from the GPU (``ready``: a CUDA event the thread waits on).
    Before any row of a batch is buffered, the thread checks that every row is finite in the
    stream and in the storage dtype, and otherwise stops with :class:`StreamOverflowError`
    (its message says where from: ``source``). An error in the writer is raised by the next
    ``append`` or by ``close``: bad input (an InputError) as it is, any other wrapped in a
    RuntimeError naming the shard."""

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
        source: StreamSource | None = None,
    ):
        if rows <= 0:
            raise ValueError(f"{path}: nothing to write (0 rows)")
        if compression not in COMPRESSORS:
            raise ValueError(f"compression {compression!r}: choose one of {sorted(COMPRESSORS)}")
        self.storage = storage_dtype(dtype)
        self.path, self.rows, self.dtype = Path(path), rows, STORAGE_DTYPES[self.storage]
        self.readouts, self.source = list(readouts), source or StreamSource()
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
                    attributes={"dtype": self.storage},
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
        finite=None,
    ) -> None:
        """Queue a batch: one ``[rows, width]`` array (numpy, or a CPU tensor) per read-out and
        the rows' index arrays; ``ready``, if given, is waited on before the arrays are read.
        A read-out's array is either already in the storage dtype (for bfloat16: a bfloat16
        tensor, or its bit patterns as int16 or uint16, :func:`to_storage`) or in any float
        dtype, cast here (:func:`encode`). ``finite``: per read-out and row, whether the row is
        finite in the stream and after the cast (``[readouts, 2, rows]`` bool, stacked from
        :func:`to_storage_checked`); without it, the writer checks the rows it casts itself and
        stores rows given in the storage dtype as they are."""
        self._raise()
        columns = [*streams, example_id, position, is_padding]
        n = len(example_id)
        if any(len(c) != n for c in columns):
            raise ValueError("every read-out and index array of a batch needs the same rows")
        if len(streams) != len(self.readouts):
            raise ValueError(f"{len(streams)} read-outs given, the shard has {len(self.readouts)}")
        if finite is not None and tuple(finite.shape) != (len(streams), 2, n):
            raise ValueError(f"finite has shape {tuple(finite.shape)}, not {(len(streams), 2, n)}")
        if self.announced + n > self.rows:
            raise ValueError(f"{self.path}: more rows than the {self.rows} announced")
        self.announced += n
        while True:  # wait for room, but not for a writer that has died
            try:
                self.queue.put((columns, ready, finite), timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None or self.error is not None:
                return
            try:
                columns, ready, finite = item
                if ready is not None:
                    ready.synchronize()
                columns = [_host(c) for c in columns]
                streams = len(self.readouts)
                if self.storage == "bfloat16":  # its bit patterns, as to_storage gives them
                    columns[:streams] = [
                        c.view(np.uint16) if c.dtype == np.int16 else c for c in columns[:streams]
                    ]
                stored, checked = zip(*(self._stored(c) for c in columns[:streams]))
                columns[:streams] = stored
                self._check(np.asarray(checked if finite is None else finite), *columns[streams:])
                self._buffer(columns)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                self.error = error
                return

    def _stored(self, column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A read-out's rows in the stored dtype, and the ``finite`` flags of :meth:`append` for
        them ([2, rows]): rows given in the stored dtype are stored as given (all flags true:
        the caller has checked them, or stores NaN or inf on purpose, as the tests of the
        readers' refusal do); rows cast here (:func:`encode`) are checked here."""
        if column.dtype == self.dtype:
            return column, np.ones((2, len(column)), bool)
        if column.dtype == np.bool_ or not np.issubdtype(column.dtype, np.number):
            raise TypeError(f"read-out rows of dtype {column.dtype} for {self.storage} storage")
        stored = encode(column, self.storage)
        if self.storage == "bfloat16":  # an exponent of all ones is inf or NaN
            after = ((stored & 0x7F80) != 0x7F80).all(axis=1)
        else:
            after = np.isfinite(stored).all(axis=1)
        return stored, np.stack((np.isfinite(column).all(axis=1), after))

    def _check(self, finite, example_id, position, is_padding) -> None:
        """Refuse a batch with a row that is not finite as stored (:class:`StreamOverflowError`
        for its first read-out point and row)."""
        if finite.all():
            return
        r, i = (int(v) for v in np.argwhere(~finite.all(axis=1))[0])
        message = overflow_message(
            self.readouts[r],
            int(example_id[i]),
            int(position[i]) if self.source.tokens else None,
            bool(is_padding[i]),
            not bool(finite[r, 0, i]),
            self.storage,
            self.source,
        )
        raise StreamOverflowError(message)  # the stage names the job (its shard)

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
        if isinstance(self.error, InputError):  # bad input, said as it is (a one-line error)
            raise self.error
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
        self.group.attrs.update({"dtype": self.storage, **attributes})

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


def read_rows(
    group: zarr.Group,
    name: str,
    start: int,
    stop: int,
    shard: str | Path,
    array: zarr.Array | None = None,
) -> np.ndarray:
    """Rows ``start:stop`` of array ``name`` of a shard through Zarr's codec pipeline (the
    reference that :func:`read_rows_direct` equals), as float values for a read-out point
    (bfloat16 decoded to float32, :func:`decode`). A chunk whose crc32c checksum or zstd
    frame does not match its bytes raises ShardError naming the shard (and the output cache
    entry it came from): a corrupted chunk is refused, never used. ``array``: ``group[name]``
    if the caller holds it already (opening it reads its metadata)."""
    array = group[name] if array is None else array
    dtype = stored_dtype(array)
    try:
        rows = array[start:stop]
    except (ValueError, RuntimeError, OSError) as error:
        raise ShardError(
            f"{shard}: {name} rows {start}:{stop} are corrupted on disk ({error})"
            f"{provenance(Path(shard, name))}"
        ) from None
    return decode(rows, dtype)


# --- reading one shard's rows straight from its files (the layout write_raw_shard writes) ---


def file_rows(array: zarr.Array) -> int:
    """The rows of one file of ``array``: a shard's with the sharding codec, else a chunk's."""
    return array.shards[0] if array.shards else array.chunks[0]


def _is_raw(codecs) -> bool:
    """Whether ``codecs`` are the raw bytes of a chunk (little-endian) and their crc32c."""
    return (
        len(codecs) == 2
        and isinstance(codecs[0], BytesCodec)
        and (codecs[0].endian is None or codecs[0].endian.value == "little")
        and isinstance(codecs[1], Crc32cCodec)
    )


def raw_layout(array: zarr.Array) -> tuple[int, int] | None:
    """(rows of a shard file, rows of a chunk) of an array in the raw layout (what
    :func:`write_raw_shard` writes, and Zarr with the same codecs); None otherwise."""
    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or array.shards is None:
        return None
    sharding = codecs[0]
    whole_rows = array.shards[1:] == array.shape[1:] == tuple(sharding.chunk_shape[1:])
    if (
        not whole_rows
        or sharding.index_location.value != "end"
        or not _is_raw(sharding.codecs)
        or not _is_raw(sharding.index_codecs)
    ):
        return None
    return array.shards[0], sharding.chunk_shape[0]


class _Corrupted(Exception):
    """A shard file whose bytes do not match what its index and checksums say."""


def _checked(data: np.ndarray | bytes, checksum: bytes, what: str) -> None:
    if google_crc32c.value(data) != int.from_bytes(checksum, "little"):
        raise _Corrupted(f"{what}: crc32c mismatch")


def read_rows_direct(
    group: zarr.Group,
    name: str,
    start: int,
    stop: int,
    shard: str | Path,
    array: zarr.Array | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Rows ``start:stop`` of array ``name`` of a shard, as :func:`read_rows` gives them, read
    straight from the files where the array is in the raw layout (one read a chunk, every
    crc32c verified: about a third of the CPU time of Zarr's codec pipeline), else through
    Zarr. A chunk or shard file not stored reads as the fill value, as in Zarr
    (:func:`open_shard` has already refused an activation shard with a file missing);
    bfloat16 is decoded to float32; a chunk or index whose checksum does not match raises
    ShardError naming the shard. ``array``: ``group[name]`` if the caller holds it already;
    ``out``: an array of the rows' shape and (decoded) dtype to read them into, and return.
    For many reads of one array, open an :class:`ArrayReader` once."""
    return ArrayReader(group, name, shard, array).read(start, stop, out)


class ArrayReader:
    """One array of a finished shard, opened for many reads (:meth:`read`, as
    :func:`read_rows_direct`): its layout, storage dtype and file names worked out once, and
    each shard file's index kept once read and verified (16 bytes a chunk)."""

    def __init__(
        self, group: zarr.Group, name: str, shard: str | Path, array: zarr.Array | None = None
    ):
        self.group, self.name, self.shard = group, name, Path(shard)
        self.array = group[name] if array is None else array
        self.layout = raw_layout(self.array)
        self.storage = stored_dtype(self.array)
        self.rows = self.array.shape[0]
        self.row_shape = tuple(self.array.shape[1:])
        self.raw_dtype = np.dtype(self.array.dtype).newbyteorder("<")
        self.dtype = np.dtype(np.float32) if self.storage == "bfloat16" else self.array.dtype
        self._indexes: dict[int, np.ndarray] = {}

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` as float values (or index values), into ``out`` if given."""
        if self.layout is None:
            rows = read_rows(self.group, self.name, start, stop, self.shard, self.array)
        else:
            start, stop, _ = slice(start, stop).indices(self.rows)
            stop = max(start, stop)
            direct = out if out is not None and self.storage != "bfloat16" else None
            try:
                rows = self._read_raw(start, stop, direct)
            except (_Corrupted, OSError) as error:
                raise ShardError(
                    f"{self.shard}: {self.name} rows {start}:{stop} are corrupted on disk "
                    f"({error}){provenance(self.shard / self.name)}"
                ) from None
            if direct is not None:
                return out
            rows = decode(rows, self.storage)
        if out is None:
            return rows
        out[...] = rows
        return out

    def _key(self, index: int) -> str:
        return f"{self.name}/c/{index}" + ("/0" if len(self.row_shape) else "")

    def _index(self, file, index: int, chunks: int) -> np.ndarray:
        """The (offset, length) of each chunk of shard file ``index``, its checksum verified."""
        entries = self._indexes.get(index)
        if entries is None:
            file.seek(-(16 * chunks + 4), 2)
            index_bytes = file.read(16 * chunks + 4)
            _checked(index_bytes[:-4], index_bytes[-4:], f"{self._key(index)} index")
            entries = np.frombuffer(index_bytes[:-4], "<u8").reshape(chunks, 2)
            self._indexes[index] = entries
        return entries

    def _read_raw(self, start: int, stop: int, out=None) -> np.ndarray:
        """Rows ``start:stop``, into ``out`` if given (the stored dtype, C-contiguous rows),
        each whole chunk read straight into place and checked."""
        shard_rows, chunk_rows = self.layout
        chunks = shard_rows // chunk_rows
        row_shape, dtype = self.row_shape, self.raw_dtype
        expected = (stop - start, *row_shape)
        if out is None:
            out = np.empty(expected, dtype)
        elif out.shape != expected or out.dtype != dtype:
            raise ValueError(f"out is {out.dtype}{out.shape}, not {dtype}{expected}")
        chunk_bytes = chunk_rows * math.prod(row_shape) * dtype.itemsize
        fill = self.array.fill_value
        for index in range(start // shard_rows, -(-stop // shard_rows)):
            key = self._key(index)
            path = os.path.join(self.shard, key)
            if not os.path.exists(path):  # no chunk of it stored, as Zarr reads it
                low, high = max(start, index * shard_rows), min(stop, (index + 1) * shard_rows)
                out[low - start : high - start] = fill
                continue
            with open(path, "rb") as file:
                entries = self._index(file, index, chunks)
                for c in range(chunks):
                    first = index * shard_rows + c * chunk_rows
                    low, high = max(start, first), min(stop, first + chunk_rows)
                    if low >= high:
                        continue
                    target = out[low - start : high - start]
                    offset, length = int(entries[c, 0]), int(entries[c, 1])
                    if offset == NOT_STORED:
                        target[...] = fill
                        continue
                    if length != chunk_bytes + 4:
                        raise _Corrupted(f"{key} chunk {c}: {length} bytes, not {chunk_bytes + 4}")
                    file.seek(offset)
                    whole = high - low == chunk_rows and target.flags.c_contiguous  # into place
                    rows = target if whole else np.empty((chunk_rows, *row_shape), dtype)
                    data = rows.reshape(-1).view(np.uint8)
                    if file.readinto(memoryview(data)) != chunk_bytes:
                        raise _Corrupted(f"{key} chunk {c}: the file ends inside it")
                    _checked(data, file.read(4), f"{key} chunk {c}")
                    if not whole:
                        target[...] = rows[low - first : high - first]
        return out.astype(self.array.dtype, copy=False)
