"""Rows of an activation shard's arrays read straight from its files, for the stages that read
every row (statistics, top examples).

An array stored uncompressed (``extract.compression: none``, the default) is laid out as
:func:`activations.write_raw_shard` writes it and as Zarr's sharding codec reads it: in each
shard file, every inner chunk's C-order little-endian bytes followed by their crc32c, then the
index ((offset, length) as little-endian uint64 a chunk, all ones for a chunk not stored) and
its crc32c. Such rows are read into the output array with one read a chunk and every checksum
verified: about a third of the CPU time of Zarr's codec pipeline, which on a few cores competes
with the statistics themselves. Any other layout (zstd) is read through Zarr. Either way a
read-out point stored as bfloat16 (uint16 bit patterns) is decoded to float32
(:func:`activations.decode`), so callers see float values whatever the storage dtype.
"""

from __future__ import annotations

import math
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

from workflow_scripts.activations import ShardError, decode, stored_dtype
from workflow_scripts.activations import read_rows as read_rows_with_zarr
from workflow_scripts.output_cache import provenance

NOT_STORED = 2**64 - 1  # an index entry's offset and length for a chunk not written


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
    """(rows of a shard file, rows of a chunk) of an array in the raw layout; None otherwise."""
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


def read_rows(group: zarr.Group, name: str, start: int, stop: int, shard: str | Path) -> np.ndarray:
    """Rows ``start:stop`` of array ``name`` of a shard, as :func:`activations.read_rows` gives
    them (a chunk or shard file not stored reads as the fill value, as in Zarr; open_shard has
    already refused an activation shard with a file missing; bfloat16 decoded to float32); a
    chunk or index whose checksum does not match raises ShardError naming the shard."""
    array = group[name]
    layout = raw_layout(array)
    if layout is None:
        return read_rows_with_zarr(group, name, start, stop, shard)
    dtype = stored_dtype(array)
    start, stop, _ = slice(start, stop).indices(array.shape[0])
    try:
        rows = _read_raw(array, name, Path(shard), layout, start, max(start, stop))
    except (_Corrupted, OSError) as error:
        raise ShardError(
            f"{shard}: {name} rows {start}:{stop} are corrupted on disk ({error})"
            f"{provenance(Path(shard, name))}"
        ) from None
    return decode(rows, dtype)


def _read_raw(array, name: str, shard: Path, layout, start: int, stop: int) -> np.ndarray:
    shard_rows, chunk_rows = layout
    chunks = shard_rows // chunk_rows
    row_shape = array.shape[1:]
    dtype = np.dtype(array.dtype).newbyteorder("<")
    out = np.empty((stop - start, *row_shape), dtype)
    chunk_bytes = chunk_rows * math.prod(row_shape) * dtype.itemsize
    for index in range(start // shard_rows, -(-stop // shard_rows)):
        key = Path(name, "c", str(index), *(["0"] if array.ndim == 2 else []))
        if not (shard / key).exists():  # no chunk of it stored, as Zarr reads it
            low, high = max(start, index * shard_rows), min(stop, (index + 1) * shard_rows)
            out[low - start : high - start] = array.fill_value
            continue
        with open(shard / key, "rb") as file:
            file.seek(-(16 * chunks + 4), 2)
            index_bytes = file.read(16 * chunks + 4)
            _checked(index_bytes[:-4], index_bytes[-4:], f"{key} index")
            entries = np.frombuffer(index_bytes[:-4], "<u8").reshape(chunks, 2)
            for c in range(chunks):
                first = index * shard_rows + c * chunk_rows
                low, high = max(start, first), min(stop, first + chunk_rows)
                if low >= high:
                    continue
                target = out[low - start : high - start]
                offset, length = (int(v) for v in entries[c])
                if offset == NOT_STORED:
                    target[...] = array.fill_value
                    continue
                if length != chunk_bytes + 4:
                    raise _Corrupted(f"{key} chunk {c}: {length} bytes, not {chunk_bytes + 4}")
                file.seek(offset)
                whole = high - low == chunk_rows  # read straight into the output
                rows = target if whole else np.empty((chunk_rows, *row_shape), dtype)
                data = rows.reshape(-1).view(np.uint8)
                if file.readinto(memoryview(data)) != chunk_bytes:
                    raise _Corrupted(f"{key} chunk {c}: the file ends inside it")
                _checked(data, file.read(4), f"{key} chunk {c}")
                if not whole:
                    target[...] = rows[low - first : high - first]
    return out.astype(array.dtype, copy=False)
