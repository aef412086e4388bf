"""Training data from the stored stream: :class:`RowDataset`, batches of rows of one or several
read-out points for a ``torch.utils.data.DataLoader``, shuffled by whole chunks within bounded
windows, the same batches whatever the number of workers, resumable at (epoch, step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from workflow_scripts import stream
from workflow_scripts.activations import layer_name
from workflow_scripts.stream import StreamError

WINDOW_BYTES = 32 << 20  # float32 bytes of one shuffle window, by default


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One epoch of a RowDataset: per global step, the batch it is. Shuffled: ``lanes`` lanes
    each take every ``lanes``-th window and cut its rows into batches; steps go round the lanes
    that still have batches. In order: one lane of one window holding every unit."""

    windows: list[np.ndarray]  # units of each window
    window_kept: np.ndarray  # kept rows of each window
    lane_windows: list[list[int]]  # windows of each lane, in order
    lane_ends: list[np.ndarray]  # cumulative kept rows at the end of each window of a lane
    steps: np.ndarray  # [steps, 2]: (lane, batch of the lane)
    lane_rows: np.ndarray  # kept rows of each lane


class RowDataset(torch.utils.data.IterableDataset):
    """Batches of rows of one or several read-out points of an activation set, for training
    (a probe, a sparse autoencoder): use it with ``DataLoader(dataset, batch_size=None,
    num_workers=...)``.

    Each batch is a dict: ``layer-{k}`` per read-out point, ``[batch, width]`` tensors of
    ``dtype``, and ``example_id`` and ``position`` (int64). Padding rows are dropped unless
    ``include_padding``.

    Shuffled (the default), an epoch reads whole chunks: the chunks in a seeded random order,
    grouped into windows of about ``window_rows`` rows (default: 32 MB as float32); each window's
    rows in a seeded random order. ``lanes`` lanes take every ``lanes``-th window and each cuts
    its rows into batches, and the epoch goes round the lanes, so consecutive batches come from
    different windows. Unshuffled, batches are consecutive rows. Every draw is seeded by
    ``seed``, the epoch and the window, so an epoch is the same whatever the machine.

    The same batches in the same order whatever ``num_workers``: a worker makes the batches
    whose step is its turn in the DataLoader's round-robin, and with ``lanes`` a multiple of the
    workers each worker reads only its lanes' windows (otherwise they read more, to the same
    result). Memory: a window per lane, whatever the rows. ``set_epoch(epoch)`` before each
    epoch (recreate the DataLoader's iterator; no ``persistent_workers``), and
    ``set_position(epoch, step)`` to resume: the batches from ``step`` on, exactly as an
    uninterrupted epoch gives them. ``len()`` is the batches the next iteration yields. The
    last batch of each lane is short unless ``drop_last``.
    """

    def __init__(
        self,
        source,
        readouts: int | Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        include_padding: bool = False,
        drop_last: bool = False,
        window_rows: int | None = None,
        lanes: int = 4,
        dtype: torch.dtype = torch.float32,
        epoch: int = 0,
        step: int = 0,
    ):
        super().__init__()
        self.acts = stream.source(source)
        self.readouts = [readouts] if isinstance(readouts, (int, np.integer)) else list(readouts)
        if not self.readouts:
            raise ValueError("no read-out points asked for")
        if batch_size < 1 or lanes < 1:
            raise ValueError("batch_size and lanes are at least 1")
        self.names = [layer_name(int(k)) for k in self.readouts]
        widths = [self.acts.readout(int(k)).width for k in self.readouts]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.include_padding, self.drop_last, self.dtype = include_padding, drop_last, dtype
        self.lanes = lanes
        self.window_rows = window_rows or max(1, WINDOW_BYTES // (4 * sum(widths)))
        self._units, self._kept = self._count_units()
        self._ends = np.cumsum(self._kept)  # kept rows up to the end of each unit, in order
        self._plan_cache: tuple[int, _Plan] | None = None
        self.set_position(epoch, step)

    def _count_units(self) -> tuple[np.ndarray, np.ndarray]:
        """The chunks of the set as units ``[units, 3]`` (shard, first row, stop row) and the
        rows each keeps (padding dropped unless included): one pass over ``is_padding``."""
        units, kept = [], []
        for i, shard in enumerate(self.acts._shards):
            chunk = self.acts.chunk_rows(i, self.names[0])
            for name in (*self.names[1:], "example_id"):
                if self.acts.chunk_rows(i, name) != chunk:
                    raise StreamError(f"{shard.path}: {name} is chunked unlike {self.names[0]}")
            starts = np.arange(0, shard.rows, chunk, dtype=np.int64)
            stops = np.minimum(starts + chunk, shard.rows)
            units.append(np.stack([np.full_like(starts, i), starts, stops], axis=1))
            if self.include_padding:
                kept.append(stops - starts)
                continue
            counts = np.zeros(len(starts), np.int64)
            step = max(chunk, (1 << 24) // chunk * chunk)
            for start in range(0, shard.rows, step):
                stop = min(start + step, shard.rows)
                real = ~self.acts._read_shard(i, "is_padding", start, stop)
                first = start // chunk
                sums = np.add.reduceat(real, np.arange(0, stop - start, chunk))
                counts[first : first + len(sums)] = sums
            kept.append(counts)
        return np.concatenate(units), np.concatenate(kept)

    @property
    def rows(self) -> int:
        """The rows an epoch yields (before ``drop_last``)."""
        return int(self._kept.sum())

    def set_epoch(self, epoch: int) -> None:
        """Iterate epoch ``epoch`` next, from its first batch."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, step: int) -> None:
        """Iterate epoch ``epoch`` from batch ``step`` next: the batches an uninterrupted epoch
        gives from there."""
        total = len(self._plan(epoch).steps)
        if not 0 <= step <= total:
            raise ValueError(f"step {step} is outside 0..{total} (the batches of an epoch)")
        self.epoch, self.step = epoch, step

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.step

    @property
    def batches_per_epoch(self) -> int:
        return len(self._plan(self.epoch).steps)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.step

    def _plan(self, epoch: int) -> _Plan:
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        n = len(self._units)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(n)
            chunk = int(np.median(self._units[:, 2] - self._units[:, 1])) if n else 1
            per_window = max(1, self.window_rows // max(1, chunk))
            windows = [order[i : i + per_window] for i in range(0, n, per_window)]
            lanes = max(1, min(self.lanes, len(windows)))
        else:
            windows, lanes = [np.arange(n)], 1
        window_kept = np.array([self._kept[w].sum() for w in windows], np.int64)
        lane_windows = [list(range(s, len(windows), lanes)) for s in range(lanes)]
        lane_ends = [np.cumsum(window_kept[w]) for w in lane_windows]
        lane_rows = np.array([int(e[-1]) if len(e) else 0 for e in lane_ends], np.int64)
        counts = lane_rows // self.batch_size
        if not self.drop_last:
            counts += lane_rows % self.batch_size > 0
        rounds = range(int(counts.max(initial=0)))
        steps = [(s, r) for r in rounds for s in range(lanes) if counts[s] > r]
        plan = _Plan(
            windows,
            window_kept,
            lane_windows,
            lane_ends,
            np.array(steps, np.int64).reshape(-1, 2),
            lane_rows,
        )
        self._plan_cache = (epoch, plan)
        return plan

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self._plan(self.epoch)
        loaded: dict[int, dict] = {}  # window -> its rows (and their order)
        cached: dict = {}  # unshuffled: the last units read
        for step in range(self.step + worker, len(plan.steps), workers):
            lane, batch = (int(v) for v in plan.steps[step])
            if self.shuffle:
                yield self._shuffled_batch(plan, lane, batch, loaded)
            else:
                yield self._ordered_batch(plan, batch, cached)

    def _batch_range(self, plan: _Plan, lane: int, batch: int) -> tuple[int, int]:
        start = batch * self.batch_size
        return start, min(start + self.batch_size, int(plan.lane_rows[lane]))

    def _shuffled_batch(self, plan: _Plan, lane: int, batch: int, loaded: dict) -> dict:
        start, stop = self._batch_range(plan, lane, batch)
        ends = plan.lane_ends[lane]
        windows = plan.lane_windows[lane]
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, stop - 1, side="right"))
        lanes = len(plan.lane_windows)
        for j in [j for j in loaded if j % lanes == lane and j // lanes < first]:
            del loaded[j]  # this lane's windows now behind it
        pieces = []
        for position in range(first, last + 1):
            j = windows[position]
            if j not in loaded:
                loaded[j] = self._load_window(plan, j)
            begin = int(ends[position - 1]) if position else 0
            a, b = max(start, begin) - begin, min(stop, int(ends[position])) - begin
            rows = loaded[j]["order"][a:b]
            pieces.append({key: value[rows] for key, value in loaded[j].items() if key != "order"})
        return self._tensors(pieces)

    def _load_window(self, plan: _Plan, j: int) -> dict:
        """The kept rows of window ``j``'s units, read in stored order (neighbouring chunks
        at once), and a seeded random order of them."""
        units = self._units[np.sort(plan.windows[j])]  # units are numbered in stored order
        columns = self._read_units(units)
        rng = np.random.default_rng([self.seed, self.epoch, 1, j])
        columns["order"] = rng.permutation(int(plan.window_kept[j]))
        return columns

    def _read_units(self, units: np.ndarray) -> dict:
        """The kept rows of ``units`` (in the order given), each array a column."""
        names = [*self.names, "example_id", "position"]
        if not self.include_padding:
            names.append("is_padding")
        runs = []  # (shard, start, stop) of consecutive units
        for shard, start, stop in units.tolist():
            if runs and runs[-1][0] == shard and runs[-1][2] == start:
                runs[-1][2] = stop
            else:
                runs.append([shard, start, stop])
        columns = {name: self.acts.read_spans(name, runs) for name in names}
        if not self.include_padding:
            keep = ~columns.pop("is_padding")
            columns = {n: c[keep] for n, c in columns.items()}
        return columns

    def _ordered_batch(self, plan: _Plan, batch: int, cached: dict) -> dict:
        """Batch ``batch`` of the rows in stored order: read from the units that hold it, the
        last of them kept for the next batch (which starts in it)."""
        start, stop = self._batch_range(plan, 0, batch)
        ends = self._ends
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, stop - 1, side="right"))
        pieces = []
        if cached.get("unit") == first:  # the previous batch ended in this unit
            begin = int(ends[first - 1]) if first else 0
            a, b = start - begin, min(stop, int(ends[first])) - begin
            pieces.append({n: c[a:b] for n, c in cached["columns"].items()})
            first += 1
        if first <= last:
            columns = self._read_units(self._units[first : last + 1])
            begin = int(ends[first - 1]) if first else 0
            a, b = max(start, begin) - begin, stop - begin
            pieces.append({n: c[a:b] for n, c in columns.items()})
            tail = (int(ends[last - 1]) if last else 0) - begin
            cached.update(unit=last, columns={n: c[tail:] for n, c in columns.items()})
        return self._tensors(pieces)

    def _tensors(self, pieces: list[dict]) -> dict:
        batch = {}
        for name in (*self.names, "example_id", "position"):
            parts = [p[name] for p in pieces]
            data = np.concatenate(parts) if len(parts) != 1 else np.ascontiguousarray(parts[0])
            tensor = torch.from_numpy(data)
            batch[name] = tensor.to(self.dtype) if name in self.names else tensor.long()
        return batch
