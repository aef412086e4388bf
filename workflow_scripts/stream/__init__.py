"""The stored residual stream of one model on one dataset, read as one dataset.

``results/activations/{model}/{dataset}/`` holds one Zarr group per extraction shard
(``shard-{i}.zarr``, the layout in docs/formats.md). :func:`open_activations` opens the folder as
one :class:`ActivationSet`::

    from workflow_scripts.stream import open_activations

    acts = open_activations("results/activations/gpt2-init/corpus")
    acts.readouts          # [Readout(index=0, stage=0, block=0, name='embeddings', width=64), ...]
    x = acts[3]            # read-out point 3: a lazy [rows, width] view over every shard
    x[1000:2000]           # rows 1000 to 1999 as a numpy array (float16 as stored; bfloat16 as
    x[[5, 17, 40_000]]     #   float32): only the chunks that hold them are read, every crc32c
    x.of_examples([7, 9])  #   checked; the rows of examples 7 and 9
    acts.example_id[1000:2000], acts.position[1000:2000], acts.is_padding[1000:2000]
    acts.digests           # sha256 of the model manifest and the dataset file, the code's key

Nothing is read until asked for, and memory stays bounded by what is asked for: a whole
read-out point is never held. The shards of a set must agree on everything that shapes their
content (read-out points, storage dtype, extraction options, model, dataset, code); a shard that
does not is refused, by name. One shard's rows are read by :mod:`workflow_scripts.activations`,
the owner of the shard layout (it writes it too); the stages that read stored activations
(statistics, top examples, the feature page) read them through :meth:`ActivationSet.blocks`.

The package's other modules, also reachable from here: :class:`RowDataset`
(``stream.training``), a ``torch.utils.data`` dataset of shuffled batches of rows for training
probes and sparse autoencoders; :func:`export` (``stream.exporting``), read-out points written as
a Hugging Face dataset; and the command line, ``python -m workflow_scripts.stream export``. They
are imported when first used, so a stage that reads blocks runs (and is keyed by) the reader
alone. docs/stream.md shows them all.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import importlib
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from workflow_scripts.activations import (
    INDEX_ARRAYS,
    ArrayReader,
    file_rows,
    layer_name,
    open_shard,
    stored_dtype,
)
from workflow_scripts.models.adapter import Readout
from workflow_scripts.stage import InputError

SHARD_NAME = re.compile(r"shard-(\d+)\.zarr")
BLOCK_BYTES = 64 << 20  # float32 bytes of one block of rows the stages read
RUN_BYTES = 64 << 20  # at most this much read at once to gather scattered rows
READ_THREADS = 2  # threads reading the files of one read (copy in one, checksum in another)
_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (the process, its reading threads)
# the attributes the shards of one set agree on, and how an error names each
AGREED = (
    ("family", "the model family"),
    ("modality", "the modality"),
    ("pooling", "the pooling"),
    ("dtype", "the storage dtype"),
    ("model_dtype", "the dtype the model ran in"),
    ("options", "the extraction options"),
    ("shards", "the number of shards"),
)
DIGESTS = (("model", "the model"), ("dataset", "the dataset"), ("code", "the extraction code"))


class StreamError(InputError):
    """Stored activations that cannot be read as asked: a folder that is not an activation set,
    shards that do not belong together, a read-out point or example that is not there."""


def _short(value) -> str:
    """A value for a message: a digest shortened to 12 hex digits."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    return repr(value)


def _points(records: list[dict]) -> str:
    indices = [r["index"] for r in records]
    return f"{indices[0]}..{indices[-1]}" if indices else "none"


@dataclasses.dataclass
class _Shard:
    path: Path
    rows: int
    attrs: dict
    group: zarr.Group | None = None
    readers: dict = dataclasses.field(default_factory=dict)  # name -> its ArrayReader, once


class ActivationSet:
    """The shards of one model on one dataset as one set of rows (see the module docstring).

    Open a folder with :func:`open_activations`, or name the shards with :meth:`from_shards`.
    ``acts[k]`` is read-out point k as a :class:`RowView`; ``acts.example_id``,
    ``acts.position`` and ``acts.is_padding`` are the rows' index arrays, also as views.
    Attributes: ``readouts`` (:class:`Readout`: index, stage, block, name, width), ``rows``,
    ``shards`` (paths), ``attrs`` (the first shard's group attributes), ``digests``,
    ``options``, ``dtype`` (the storage dtype), ``modality``, ``pooling``, and ``model`` and
    ``dataset``: the names in an opened folder's path (None for shards named one by one).

    The shards are checked when the set is opened: each is a finished shard with every file
    (:func:`activations.open_shard`), and all agree with the first on the read-out points
    (record and storage dtype) and on the attributes that shape their content; ``readouts``
    limits the read-out points checked up front to those (the rest are checked when first
    asked for). A set is cheap to pickle: DataLoader workers reopen the shards by path.
    """

    def __init__(
        self,
        shards: Sequence[str | Path],
        readouts: Sequence[int] | None = None,
        name: str | Path | None = None,
        model: str | None = None,
        dataset: str | None = None,
    ):
        if not shards:
            raise StreamError(f"{name or 'activation set'}: no shards given")
        self.name = str(name) if name is not None else str(shards[0])
        self.model, self.dataset = model, dataset
        self._shards = []
        for path in shards:
            group = open_shard(path)
            rows = group["example_id"].shape[0] if "example_id" in group else 0
            self._shards.append(_Shard(Path(path), int(rows), dict(group.attrs), group))
        self.attrs = self._shards[0].attrs
        self._records = {int(r["index"]): dict(r) for r in self.attrs["readouts"]}
        self.readouts = [Readout(**r) for r in self.attrs["readouts"]]
        self._checked: set[int] = set()
        self._dtypes: dict[int, str] = {}
        if readouts is None:  # the whole set: first what made it, then each read-out point
            self._check_attributes(all_readouts=True)
        for k in self._records if readouts is None else readouts:
            self._check_readout(int(k))
        if readouts is not None:  # the read-out points asked for first: the closer message
            self._check_attributes(all_readouts=False)
        self.offsets = np.concatenate([[0], np.cumsum([s.rows for s in self._shards])])
        self.rows = int(self.offsets[-1])

    @classmethod
    def from_shards(cls, shards: Sequence[str | Path], readouts: Sequence[int] | None = None):
        """The set of ``shards`` (in row order), as a stage gets them from its rule: only
        ``readouts`` (default: all) are checked up front."""
        return cls(shards, readouts)

    # --- what the set is ---

    @property
    def shards(self) -> list[Path]:
        return [s.path for s in self._shards]

    @property
    def digests(self) -> dict:
        return dict(self.attrs.get("digests", {}))

    @property
    def options(self) -> dict:
        return dict(self.attrs.get("options", {}))

    @property
    def dtype(self) -> str | None:
        return self.attrs.get("dtype")

    @property
    def modality(self) -> str | None:
        return self.attrs.get("modality")

    @property
    def pooling(self) -> str | None:
        return self.attrs.get("pooling")

    @property
    def indices(self) -> list[int]:
        """The read-out points' indices, in order."""
        return list(self._records)

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return (
            f"<ActivationSet {self.name}: {self.rows} rows in {len(self._shards)} shard(s), "
            f"read-out points {_points(list(self._records.values()))}>"
        )

    def readout(self, k: int) -> Readout:
        """The record of read-out point ``k`` (StreamError if there is none)."""
        self._check_readout(k)
        return Readout(**self._records[k])

    def __getitem__(self, k) -> RowView:
        """Read-out point ``k`` (its index, or its array's name ``layer-{k}``), or an index
        array by name (``example_id``, ``position``, ``is_padding``), as a lazy view."""
        if isinstance(k, str):
            if k in INDEX_ARRAYS:
                return RowView(self, k)
            match = re.fullmatch(r"layer-(\d+)", k)
            if match is None:
                raise StreamError(
                    f"{self.name}: no array {k!r}; it has layer-{{k}} for read-out points "
                    f"{_points(list(self._records.values()))} and {', '.join(INDEX_ARRAYS)}"
                )
            k = int(match[1])
        if isinstance(k, Readout):
            k = k.index
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
            raise TypeError(f"a read-out point is an int index, not {type(k).__name__}")
        return RowView(self, layer_name(int(k)), self.readout(int(k)))

    @property
    def example_id(self) -> RowView:
        return RowView(self, "example_id")

    @property
    def position(self) -> RowView:
        return RowView(self, "position")

    @property
    def is_padding(self) -> RowView:
        return RowView(self, "is_padding")

    # --- checks ---

    def _check_readout(self, k: int) -> None:
        """Read-out point ``k`` is in every shard, with the same record and storage dtype."""
        if k in self._checked:
            return
        first = self._shards[0]
        for shard in self._shards:
            records = {int(r["index"]): r for r in shard.attrs["readouts"]}
            name = layer_name(k)
            if k not in records or name not in self._group(shard):
                raise StreamError(
                    f"{shard.path}: no read-out point {k}; it has read-out points "
                    f"{_points(list(records.values()))}"
                )
            dtype = stored_dtype(self._group(shard)[name])
            if shard is first:
                self._dtypes[k] = dtype
            elif records[k] != self._records[k] or dtype != self._dtypes[k]:
                raise StreamError(
                    f"shards disagree on layer {k}: {first.path} has {self._records[k]} as "
                    f"{self._dtypes[k]}, {shard.path} has {records[k]} as {dtype}"
                )
        self._checked.add(k)

    def _check_attributes(self, all_readouts: bool) -> None:
        """Every shard agrees with the first on what shapes the content."""
        first = self._shards[0]
        for shard in self._shards[1:]:
            disagree = None
            if all_readouts and shard.attrs["readouts"] != first.attrs["readouts"]:
                disagree = (
                    "the read-out points",
                    _points(first.attrs["readouts"]),
                    _points(shard.attrs["readouts"]),
                )
            for key, what in AGREED:
                if disagree is None and first.attrs.get(key) != shard.attrs.get(key):
                    disagree = (what, _short(first.attrs.get(key)), _short(shard.attrs.get(key)))
            ours, theirs = first.attrs.get("digests", {}), shard.attrs.get("digests", {})
            for key, what in DIGESTS:
                if disagree is None and ours.get(key) != theirs.get(key):
                    disagree = (
                        f"{what} (digests.{key})",
                        _short(ours.get(key)),
                        _short(theirs.get(key)),
                    )
            if disagree is not None:
                what, a, b = disagree
                raise StreamError(
                    f"{shard.path}: not of the same activation set as {first.path}: shards "
                    f"disagree on {what}: {first.path.name} has {a}, {shard.path.name} has {b}"
                )

    def _check_complete(self, numbers: list[int]) -> None:
        """The shards of an opened folder are all there: shard-0 to shard-(n-1) of the n that
        their attributes say, each the shard it says it is."""
        for number, shard in zip(numbers, self._shards):
            said = shard.attrs.get("shard")
            if said is not None and said != number:
                raise StreamError(
                    f"{shard.path}: holds shard {said} of its set, not {number} (renamed?)"
                )
        total = self.attrs.get("shards")
        expected = list(range(total)) if total is not None else list(range(len(numbers)))
        missing = sorted(set(expected) - set(numbers))
        extra = sorted(set(numbers) - set(expected))
        if missing:
            said = (
                f"the set has {len(expected)} shard(s) and {len(missing)} are not there"
                if total is not None
                else "shards are numbered from 0 without gaps"
            )
            raise StreamError(f"{self.name}: shard-{missing[0]}.zarr is missing; {said}")
        if extra:
            raise StreamError(
                f"{self.name}/shard-{extra[0]}.zarr: the set has {len(expected)} shard(s), "
                f"shard-0 to shard-{len(expected) - 1}; this one is left from another extraction"
            )

    # --- reading ---

    def _group(self, shard: _Shard) -> zarr.Group:
        if shard.group is None:
            shard.group = zarr.open_group(shard.path, mode="r", zarr_format=3)
        return shard.group

    def _reader(self, i: int, name: str) -> ArrayReader:
        shard = self._shards[i]
        if name not in shard.readers:
            shard.readers[name] = ArrayReader(self._group(shard), name, shard.path)
        return shard.readers[name]

    def _array(self, i: int, name: str) -> zarr.Array:
        return self._reader(i, name).array

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_shards"] = [dataclasses.replace(s, group=None, readers={}) for s in self._shards]
        return state

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (0 <= start <= stop <= rows) of array ``name`` over all shards
        (:meth:`read_spans`)."""
        if stop <= start:
            return self._read_shard(0, name, 0, 0)
        spans = []
        i = max(0, int(np.searchsorted(self.offsets, start, side="right")) - 1)
        while i < len(self._shards) and self.offsets[i] < stop:
            low, high = int(self.offsets[i]), int(self.offsets[i + 1])
            if min(stop, high) > max(start, low):
                spans.append((i, max(start, low) - low, min(stop, high) - low))
            i += 1
        return self.read_spans(name, spans)

    def read_spans(self, name: str, spans: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """The rows of ``spans`` of array ``name``, one after the other: each span is (shard,
        first row, stop row) in the shard's own rows. Read straight from the files into one
        array (``ArrayReader``, every checksum verified), a shard file's rows a task in
        :data:`READ_THREADS` threads, so that where cores are free one thread's copy from the
        disk (which runs without Python's lock) overlaps another's checksum (which holds it).
        A task a file, not a chunk: on busy cores the fewer calls are faster."""
        pieces, total = [], 0
        for i, start, stop in spans:
            unit = self._file_rows(i, name)
            low = start
            while low < stop:
                high = min(stop, (low // unit + 1) * unit)
                pieces.append((i, low, high, total))
                total += high - low
                low = high
        if len(pieces) <= 1:
            i, start, stop = spans[0] if spans else (0, 0, 0)
            return self._read_shard(i, name, start, min(max(start, stop), start + total))
        reader = self._reader(pieces[0][0], name)
        out = np.empty((total, *reader.row_shape), reader.dtype)
        tasks = [
            _reading_pool().submit(self._read_shard, i, name, low, high, out[at : at + high - low])
            for i, low, high, at in pieces
        ]
        for task in tasks:
            task.result()
        return out

    def _read_shard(self, i: int, name: str, start: int, stop: int, out=None) -> np.ndarray:
        """Rows ``start:stop`` of array ``name`` of shard ``i`` (``ArrayReader.read``)."""
        return self._reader(i, name).read(start, stop, out)

    def chunk_rows(self, i: int, name: str) -> int:
        """The rows of a chunk of array ``name`` of shard ``i``."""
        return int(self._array(i, name).chunks[0])

    def _file_rows(self, i: int, name: str) -> int:
        return int(file_rows(self._array(i, name)))

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (ints in 0..rows-1, any order, repeats allowed) of array ``name``,
        reading only the chunks that hold them (neighbouring chunks in one read)."""
        unique, inverse = np.unique(rows, return_inverse=True)
        parts = []
        shard_of = np.searchsorted(self.offsets, unique, side="right") - 1
        for i in np.unique(shard_of):
            local = unique[shard_of == i] - self.offsets[i]
            chunk = self.chunk_rows(int(i), name)
            width = self._width(name)
            most = max(1, RUN_BYTES // max(1, chunk * width * 4))  # chunks a read, at most
            chunks = local // chunk
            # runs of consecutive chunks, each read at once
            breaks = np.flatnonzero((np.diff(chunks) > 1) | (np.diff(chunks // most) != 0)) + 1
            for piece in np.split(np.arange(len(local)), breaks):
                first, last = chunks[piece[0]], chunks[piece[-1]]
                start = int(first * chunk)
                stop = int(min((last + 1) * chunk, self._shards[int(i)].rows))
                block = self._read_shard(int(i), name, start, stop)
                parts.append(block[local[piece] - start])
        if not parts:
            return self.read(name, 0, 0)
        data = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return data[inverse.reshape(-1)]

    def _width(self, name: str) -> int:
        match = re.fullmatch(r"layer-(\d+)", name)
        return self._records[int(match[1])]["width"] if match else 1

    def rows_of(self, example_ids) -> np.ndarray:
        """The rows of examples ``example_ids`` (one id or several), in the order asked, each
        example's rows in stored order. StreamError for an example with no rows: one the set
        does not hold, or one that gave nothing to store (an empty text)."""
        ids = np.atleast_1d(np.asarray(example_ids)).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"example ids are integers, not {ids.dtype}")
        found = [self._rows_of_example(int(e)) for e in ids]
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def _rows_of_example(self, example: int) -> np.ndarray:
        candidates, ranged = [], []
        for i, shard in enumerate(self._shards):
            span = shard.attrs.get("example_range")
            if span is None or span[0] <= example < span[1]:
                candidates.append(i)
            if span is not None and span[0] <= example < span[1]:
                ranged.append(i)
        for i in candidates:
            low, high = self._bisect(i, example)
            if high > low:
                return np.arange(low, high, dtype=np.int64) + self.offsets[i]
        for i in candidates:  # a shard not sorted by example (not one extraction writes)
            rows = self._scan(i, example)
            if len(rows):
                return rows + self.offsets[i]
        first = self._shards[0].attrs.get("example_range")
        last = self._shards[-1].attrs.get("example_range")
        if ranged:
            raise StreamError(
                f"{self.name}: example {example} has no stored rows (it is in "
                f"{self._shards[ranged[0]].path.name}'s examples but gave nothing to store)"
            )
        held = (
            f"its shards hold examples {first[0]}..{last[1] - 1}"
            if first is not None and last is not None
            else f"its example ids run from {int(self.read('example_id', 0, 1)[0])} to "
            f"{int(self.read('example_id', self.rows - 1, self.rows)[0])}"
            if self.rows
            else "it has no rows"
        )
        raise StreamError(f"{self.name}: no example {example}; {held}")

    def _bisect(self, i: int, example: int) -> tuple[int, int]:
        """Rows [low, high) of shard ``i`` holding ``example``, by bisection over its
        example ids (which extraction writes in order), reading a few chunks."""
        ids = _LazyIds(self, i)
        low = bisect.bisect_left(ids, example)
        high = bisect.bisect_right(ids, example, lo=low)
        return low, high

    def _scan(self, i: int, example: int) -> np.ndarray:
        step = 1 << 20
        found = []
        for start in range(0, self._shards[i].rows, step):
            stop = min(start + step, self._shards[i].rows)
            ids = self._read_shard(i, "example_id", start, stop)
            found.append(np.flatnonzero(ids == example) + start)
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def blocks(
        self,
        readout: int,
        block_rows: int | None = None,
        include_padding: bool = True,
        index: Sequence[str] = ("example_id", "position"),
        prefetch: bool = True,
    ) -> Iterator[tuple[np.ndarray, ...]]:
        """Read-out point ``readout`` in blocks of rows, in order: ``(x, *index arrays)`` per
        block (the arrays named in ``index``), padding rows dropped unless
        ``include_padding``. A block is whole shard files of one shard, ``block_rows`` rows
        rounded down to whole files (at least one; default: about 64 MB as float32); with
        ``prefetch`` the next block is read in a thread while this one is used."""
        self._check_readout(readout)
        name = layer_name(readout)
        width = self._records[readout]["width"]
        readers = []
        for i, shard in enumerate(self._shards):
            unit = self._file_rows(i, name)
            rows = BLOCK_BYTES // (4 * width) if block_rows is None else block_rows
            size = max(unit, rows // unit * unit)
            for start in range(0, shard.rows, size):
                stop = min(start + size, shard.rows)
                readers.append(
                    functools.partial(
                        self._block, i, name, start, stop, tuple(index), include_padding
                    )
                )
        return _prefetched(readers) if prefetch else (read() for read in readers)

    def _block(self, i, name, start, stop, index, include_padding):
        columns = [self.read_spans(n, [(i, start, stop)]) for n in (name, *index)]
        if include_padding:
            return tuple(columns)
        keep = ~self.read_spans("is_padding", [(i, start, stop)])
        return tuple(c[keep] for c in columns)


def _reading_pool() -> ThreadPoolExecutor:
    """This process's reading threads (a DataLoader worker forked from a process that had
    them starts its own)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(READ_THREADS, thread_name_prefix="stream-read"))
    return _POOL[1]


def _prefetched(readers):
    """The results of ``readers`` in order, each read in a thread while the previous one is
    being used, so reading overlaps computing."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for read in readers:
            upcoming = pool.submit(read)
            if pending is not None:
                yield pending.result()
            pending = upcoming
        if pending is not None:
            yield pending.result()


class _LazyIds(Sequence):
    """The example ids of one shard as a sequence for :mod:`bisect`, read a chunk at a time
    (the chunks read last kept)."""

    def __init__(self, acts: ActivationSet, i: int):
        self.acts, self.i = acts, i
        self.chunk = acts.chunk_rows(i, "example_id")
        self.cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.acts._shards[self.i].rows

    def __getitem__(self, row: int) -> int:
        c = row // self.chunk
        if c not in self.cache:
            if len(self.cache) > 64:
                self.cache.clear()
            stop = min((c + 1) * self.chunk, len(self))
            self.cache[c] = self.acts._read_shard(self.i, "example_id", c * self.chunk, stop)
        return int(self.cache[c][row - c * self.chunk])


class RowView:
    """One array of an :class:`ActivationSet` over all its shards, read lazily: a read-out
    point ``[rows, width]`` or an index array ``[rows]``.

    Index it like a numpy array: ``view[i]``, ``view[a:b]``, ``view[a:b:step]``, ``view[[i, j,
    k]]`` (any order, repeats allowed), ``view[mask]`` (bool, one per row), and a second index
    for the columns, ``view[a:b, [3, 17]]``. Each reads only the chunks that hold the rows, every
    checksum verified, and returns a numpy array: float16 or float32 as stored, bfloat16 decoded
    to float32. ``view.of_examples(ids)``: the rows of those examples. ``np.asarray(view)`` reads
    the whole array: for a read-out point, read it in blocks instead (``ActivationSet.blocks``).
    """

    def __init__(self, acts: ActivationSet, name: str, readout: Readout | None = None):
        self.acts, self.name, self.readout = acts, name, readout
        self.shape = (acts.rows, readout.width) if readout is not None else (acts.rows,)
        if readout is not None:
            stored = acts._dtypes[readout.index]
            self.dtype = np.dtype(np.float32 if stored == "bfloat16" else stored)
        else:
            self.dtype = np.dtype(INDEX_ARRAYS[name])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        what = f"read-out point {self.readout.index} ({self.readout.name})" if self.readout else ""
        return f"<RowView {self.name} {what} {self.shape} {self.dtype} of {self.acts.name}>"

    def __array__(self, dtype=None, copy=None):
        data = self.acts.read(self.name, 0, len(self))
        return data if dtype is None else data.astype(dtype)

    def __iter__(self):
        raise TypeError(
            f"{self.name}: iterating row by row would read a chunk a row; slice it, or read "
            "blocks with ActivationSet.blocks"
        )

    def __getitem__(self, key):
        columns = ()
        if isinstance(key, tuple):
            key, columns = (key[0], key[1:]) if key else (slice(None), ())
        data = self._rows(key)
        return data[(slice(None), *columns)] if columns else data

    def _rows(self, key):
        n = len(self)
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} is out of range for {n} rows")
            return self.acts.read(self.name, i, i + 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self.acts.read(self.name, start, max(start, stop))
            return self.acts.take(self.name, np.arange(start, stop, step))
        if key is Ellipsis:
            return self.acts.read(self.name, 0, n)
        rows = np.asarray(key)
        if rows.dtype == np.bool_:
            if rows.shape != (n,):
                raise IndexError(f"a boolean index of shape {rows.shape} for {n} rows")
            rows = np.flatnonzero(rows)
        elif rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"rows are indexed by ints, slices or a bool mask, not {rows.dtype}")
        shape = rows.shape
        rows = rows.reshape(-1).astype(np.int64)
        rows = np.where(rows < 0, rows + n, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            bad = rows[(rows < 0) | (rows >= n)][0]
            raise IndexError(f"row {bad} is out of range for {n} rows")
        data = self.acts.take(self.name, rows)
        return data.reshape(*shape, *self.shape[1:])

    def of_examples(self, example_ids) -> np.ndarray:
        """The rows of examples ``example_ids``, in the order asked (see ``rows_of``)."""
        return self[self.acts.rows_of(example_ids)]


def open_activations(folder: str | Path, readouts: Sequence[int] | None = None) -> ActivationSet:
    """The activation set in ``folder`` (``results/activations/{model}/{dataset}/``): its
    ``shard-{i}.zarr`` groups in order, checked to be all there (the number of shards their
    attributes say) and to belong together. StreamError names what is wrong: a folder that is
    not there or holds no shards, a shard that is missing or from another extraction.
    ``readouts``: check only these read-out points up front (default: all)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StreamError(
            f"{folder}: no such folder; an activation set is a folder "
            "results/activations/<model>/<dataset>/ of shard-<i>.zarr groups"
        )
    found = sorted(
        (int(m[1]), p)
        for p in folder.iterdir()
        if (m := SHARD_NAME.fullmatch(p.name)) is not None and p.is_dir()
    )
    if not found:
        inside = sorted({p.parent.name for p in folder.glob("*/shard-*.zarr")})
        hint = f"; it holds the activation sets {', '.join(inside)}" if inside else ""
        raise StreamError(
            f"{folder}: not an activation set (no shard-<i>.zarr in it; an activation set is "
            f"results/activations/<model>/<dataset>/){hint}"
        )
    numbers, paths = zip(*found)
    acts = ActivationSet(
        list(paths), readouts, name=folder, model=folder.parent.name, dataset=folder.name
    )
    acts._check_complete(list(numbers))
    return acts


def source(acts) -> ActivationSet:
    """``acts`` if it is an ActivationSet, else the set in folder ``acts``."""
    return acts if isinstance(acts, ActivationSet) else open_activations(acts)


# the rest of the package, imported when first asked for (the stages never ask)
_ELSEWHERE = {
    "RowDataset": "workflow_scripts.stream.training",
    "export": "workflow_scripts.stream.exporting",
}


def __getattr__(name: str):
    if name in _ELSEWHERE:
        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ActivationSet",
    "RowDataset",
    "RowView",
    "StreamError",
    "export",
    "open_activations",
]
