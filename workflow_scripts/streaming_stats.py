"""Statistics of one read-out point, accumulated in one streaming pass over chunks of rows.

Per feature (for outliers and the top features): the largest and smallest value seen.
Per row, averaged over rows:
  kurtosis            Pearson kurtosis of the row across its features (Gaussian: 3);
  rotated_kurtosis    the same after a fixed random orthogonal rotation, averaged over the
                      rotations (``rotated_kurtosis_sd`` is the spread of the per-rotation means);
  rms                 root mean square of the row;
  max_over_median     the row's largest |x| over its median |x| (massive activations); rows
                      whose median |x| is 0 have no ratio and are counted apart.
Every row mean carries a standard error over examples: the rows of one example are not
independent, so the error is cluster-robust with examples as clusters. Memory is bounded by the
chunk: the per-example sums are closed as soon as the example's rows have passed (the rows of an
example are contiguous, as extraction writes them).
"""

from __future__ import annotations

import copy
import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

SUB_BYTES = 4 << 20  # float32 rows computed at once on the CPU
ROW_METRICS = ("kurtosis", "rotated_kurtosis", "rms", "mean_square")
AVERAGES = ("rows", "examples")  # over rows; or over each example's rows, then over examples
RMS_DEFINITIONS = ("row_mean", "root_mean_square")


def _of(average: str) -> str:
    """How a per-row value was averaged, for a setting's name (nothing for the default)."""
    return ", example mean" if average == "examples" else ""


class StatisticsError(ValueError):
    """Activations that statistics cannot be computed from: say why, never a wrong number."""


def random_rotation(width: int, seed: int, layer: int, index: int) -> np.ndarray:
    """A Haar-random orthogonal matrix, fixed by (seed, layer, index): QR of a Gaussian matrix
    with the signs of R's diagonal moved into Q."""
    rng = np.random.default_rng([seed, layer, index])
    q, r = np.linalg.qr(rng.standard_normal((width, width)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


class DenseRotation:
    """An orthogonal matrix applied to rows: ``x @ q`` (2 width^2 multiply-adds a row)."""

    def __init__(self, matrix: np.ndarray | torch.Tensor):
        self.matrix = torch.as_tensor(matrix)

    def to(self, device: str | torch.device) -> DenseRotation:
        return DenseRotation(self.matrix.to(device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix


def hadamard(n: int) -> torch.Tensor:
    """The normalised Walsh-Hadamard matrix of order ``n`` (a power of two), symmetric and
    orthogonal, in float32."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while len(h) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return (h / math.sqrt(n)).to(torch.float32)


class StructuredRotation:
    """A random orthogonal transform of rows of ``width`` features in O(width log width) work
    a row, fixed by (seed, layer, index).

    ``ROUNDS`` rounds, each: a random permutation of the features, random signs, the normalised
    Hadamard transform H_p of the first p features (p the largest power of two <= width), random
    signs on the last p features and H_p of them. The two windows overlap (p > width / 2) and
    are one window when width is a power of two. Every step is orthogonal. The signs before the
    second window and the permutations keep the windows from undoing each other's mixing (a
    one-hot row becomes a sum of random signs in every feature).

    The rows are transformed features-first ([width, rows]): a window is then a contiguous
    block, a permutation moves whole rows of memory, and H_p is the Kronecker product of
    Hadamard factors of at most ``FACTOR`` (H_p = H_a (x) H_b (x) ..., a * b * ... = p), applied
    one factor at a time as a matrix product over its axis: O(p log p) multiply-adds a row, like
    the butterflies of a fast Walsh-Hadamard transform, in two or three passes over memory
    rather than log2(p).
    """

    ROUNDS = 2
    FACTOR = 32  # the largest Hadamard factor

    def __init__(self, width: int, seed: int, layer: int, index: int):
        rng = np.random.default_rng([seed, layer, index])
        self.width = width
        self.p = 1 << (width.bit_length() - 1)
        stages = self.p.bit_length() - 1  # log2(p), shared out evenly over the factors
        count = max(1, -(-stages // (self.FACTOR.bit_length() - 1)))
        self.factors = [
            hadamard(1 << (stages // count + (i < stages % count))) for i in range(count)
        ]
        self.starts = (0,) if self.p == width else (0, width - self.p)
        self.rounds = []
        for _ in range(self.ROUNDS):
            permutation = torch.from_numpy(rng.permutation(width))
            signs = [rng.choice(np.float32([-1, 1]), (size, 1)) for size in (width, self.p)]
            self.rounds.append((permutation, *(torch.from_numpy(s) for s in signs)))

    def to(self, device: str | torch.device) -> StructuredRotation:
        moved = copy.copy(self)
        moved.factors = [h.to(device) for h in self.factors]
        moved.rounds = [tuple(t.to(device) for t in r) for r in self.rounds]
        return moved

    def _hadamard_(self, window: torch.Tensor) -> None:
        """H_p of every column of ``window`` ([p, rows], contiguous), in place: each factor over
        its axis of the [f1, f2, ..., rows] view, the last one written into ``window``."""
        y, left, *_, last = window, 1, *self.factors
        for h in self.factors:
            f = len(h)
            shape = (left, f, self.p // (left * f) * window.shape[1])
            if h is last and y is not window:
                torch.matmul(h, y.reshape(shape), out=window.view(shape))
            elif h is last:  # one factor: the product may not be written over its input
                window.copy_(torch.matmul(h, y.reshape(shape)).view_as(window))
            else:
                y = torch.matmul(h, y.reshape(shape))
            left *= f

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [rows, width] -> the transformed rows, [rows, width] (a view of a
        features-first tensor; ``x`` is kept)."""
        y = x.t().contiguous()
        for permutation, signs, window_signs in self.rounds:
            y = y.index_select(0, permutation).mul_(signs)
            for k, start in enumerate(self.starts):
                window = y[start : start + self.p]
                if k:
                    window.mul_(window_signs)
                self._hadamard_(window)
        return y.t()


ROTATIONS = {
    "haar": lambda *key: DenseRotation(random_rotation(*key)),
    "structured": StructuredRotation,
}


def make_rotation(kind: str, width: int, seed: int, layer: int, index: int):
    """The rotation ``kind`` (haar: dense Haar-random; structured: :class:`StructuredRotation`)
    of ``width`` features, fixed by (seed, layer, index)."""
    if kind not in ROTATIONS:
        raise ValueError(f"rotation {kind!r}: one of {', '.join(ROTATIONS)}")
    return ROTATIONS[kind](width, seed, layer, index)


def row_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, second central moment and Pearson kurtosis of every row (two-pass: centred
    moments, no cancellation)."""
    mean = x.mean(dim=1, keepdim=True)
    d2 = (x - mean).square_()
    m2 = d2.mean(dim=1)
    return mean[:, 0], m2, d2.square_().mean(dim=1) / m2.square()


def row_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Pearson kurtosis of every row."""
    return row_moments(x)[2]


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads)


@functools.cache
def _background() -> ThreadPoolExecutor:
    """A thread of its own for work that overlaps torch's (never the pool that work uses)."""
    return ThreadPoolExecutor(1)


def row_median_and_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median (the mean of the two middle values for an even width, as numpy's) and maximum of
    every row of ``x`` >= 0, in float32. float16 rows are sorted as their bit patterns (uint16:
    the same order for values >= 0), which numpy radix-sorts about five times faster than it
    partitions float16; other dtypes are partially sorted. Both release the GIL, so blocks of
    rows run in parallel."""
    width = x.shape[1]
    middle = sorted({(width - 1) // 2, width // 2})

    def median_and_max(rows: np.ndarray) -> np.ndarray:
        if rows.dtype == np.float16:
            parted = np.sort(rows.view(np.uint16), axis=1, kind="stable").view(np.float16)
        else:
            parted = np.partition(rows, [*middle, width - 1], axis=1)
        return np.stack(
            [
                parted[:, middle].astype(np.float32).mean(axis=1),
                parted[:, width - 1].astype(np.float32),
            ],
            axis=1,
        )

    threads = max(1, torch.get_num_threads())  # the job's thread count
    parts = np.array_split(x, max(1, min(threads, len(x) // 1024)))
    both = np.concatenate(list(_pool(threads).map(median_and_max, parts)))
    return both[:, 0], both[:, 1]


def row_median_and_max_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as :func:`row_median_and_max` with torch (on any device): the k-th values of
    each row, in float32 (exact for float16 input)."""
    x = x.float()
    width = x.shape[1]
    lower = x.kthvalue((width - 1) // 2 + 1, dim=1).values
    upper = x.kthvalue(width // 2 + 1, dim=1).values if width % 2 == 0 else lower
    return (lower + upper) / 2, x.amax(dim=1)


class ClusterMeans:
    """Means of several per-row values, with standard errors over clusters of rows (examples).

    Rows arrive in order; a cluster's rows are contiguous. Keeps O(metrics) numbers.
    """

    def __init__(self, metrics: int):
        self.sum = np.zeros(metrics)  # sum over rows
        self.sum_sq = np.zeros(metrics)  # sum over clusters of (cluster sum)^2
        self.sum_cross = np.zeros(metrics)  # sum over clusters of cluster sum * cluster rows
        self.rows_sq = 0.0  # sum over clusters of (cluster rows)^2
        self.mean_sum = np.zeros(metrics)  # sum over clusters of the cluster's mean
        self.mean_sq = np.zeros(metrics)  # sum over clusters of the cluster's mean squared
        self.rows = 0
        self.clusters = 0
        self.open_id, self.open_sum, self.open_rows = None, np.zeros(metrics), 0

    def update(self, values: np.ndarray, cluster: np.ndarray) -> None:
        """``values``: [rows, metrics] in float64; ``cluster``: [rows] ids."""
        if len(cluster) == 0:
            return
        starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]])
        sums = np.add.reduceat(values, starts, axis=0)
        counts = np.diff(np.r_[starts, len(cluster)])
        ids = cluster[starts]
        if ids[0] == self.open_id:  # the open cluster continues into this chunk
            sums[0] += self.open_sum
            counts[0] += self.open_rows
        elif self.open_id is not None:
            self._close(self.open_sum[None], np.array([self.open_rows]))
        self._close(sums[:-1], counts[:-1])
        self.open_id, self.open_sum, self.open_rows = ids[-1], sums[-1], int(counts[-1])

    def _close(self, sums: np.ndarray, counts: np.ndarray) -> None:
        self.sum += sums.sum(axis=0)
        self.sum_sq += (sums * sums).sum(axis=0)
        self.sum_cross += (sums * counts[:, None]).sum(axis=0)
        means = sums / counts[:, None]
        self.mean_sum += means.sum(axis=0)
        self.mean_sq += (means * means).sum(axis=0)
        self.rows_sq += float((counts.astype(np.float64) ** 2).sum())
        self.rows += int(counts.sum())
        self.clusters += len(counts)

    @property
    def total_rows(self) -> int:
        return self.rows + self.open_rows

    def finish(self, average: str = "rows") -> tuple[np.ndarray, np.ndarray]:
        """Means and their standard errors (NaN with fewer than two clusters): over rows (the
        error cluster-robust), or with ``average="examples"`` the mean over clusters of each
        cluster's mean (the error: their spread over the square root of their number)."""
        if self.open_id is not None:
            self._close(self.open_sum[None], np.array([self.open_rows]))
            self.open_id, self.open_rows = None, 0
        g = self.clusters
        if average == "examples":
            mean = self.mean_sum / g
            if g < 2:
                return mean, np.full_like(mean, np.nan)
            variance = np.maximum(self.mean_sq - g * mean * mean, 0) / (g - 1)
            return mean, np.sqrt(variance / g)
        mean = self.sum / self.rows
        if g < 2:
            return mean, np.full_like(mean, np.nan)
        residual = self.sum_sq - 2 * mean * self.sum_cross + mean * mean * self.rows_sq
        variance = np.maximum(residual, 0) / self.rows**2 * g / (g - 1)
        return mean, np.sqrt(variance)


class LayerStatistics:
    """Accumulates the statistics of one read-out point over chunks of rows."""

    def __init__(
        self,
        width: int,
        rotations: list,
        device: str | torch.device = "cpu",
        sort_on_device: bool | None = None,
        average: str = "rows",
        rms: str = "row_mean",
    ):
        """``rotations``: callables on a [rows, width] float32 tensor with a ``.to(device)``
        (:func:`make_rotation`), or orthogonal matrices (applied as ``x @ q``);
        ``device``: where the moments, rotations and extremes are computed (the sums are
        kept in float64 on the host); ``sort_on_device``: the median and maximum of |x| with
        torch on ``device`` rather than numpy's partition (default: on a GPU)."""
        if average not in AVERAGES or rms not in RMS_DEFINITIONS:
            raise ValueError(f"average {average!r}, rms {rms!r}: see AVERAGES, RMS_DEFINITIONS")
        self.width, self.average, self.rms = width, average, rms
        self.device = torch.device(device)
        self.sort_on_device = (
            self.device.type != "cpu" if sort_on_device is None else sort_on_device
        )
        self.rotations = [
            (DenseRotation(q) if isinstance(q, np.ndarray) else q).to(self.device)
            for q in rotations
        ]
        self.feature_max = np.full(width, -np.inf, np.float32)
        self.feature_min = np.full(width, np.inf, np.float32)
        # per-row values: kurtosis, rotation-averaged kurtosis, rms, then each rotation
        self.means = ClusterMeans(len(ROW_METRICS) + len(rotations))
        self.ratio = ClusterMeans(1)
        self.largest_ratio = -math.inf
        self.zero_median_rows = 0

    def update(self, chunk: np.ndarray, example_id: np.ndarray) -> None:
        """Add rows ``chunk`` ([rows, width], any float dtype) of examples ``example_id``."""
        if len(chunk) == 0:
            return
        chunk = np.ascontiguousarray(chunk)
        stored = torch.from_numpy(chunk).to(self.device)
        if not self.sort_on_device:  # numpy sorts in a thread while torch computes the moments
            sorting = _background().submit(row_median_and_max, np.abs(chunk))
        # on the CPU a few MB of rows at a time, so that the many passes over them stay in the
        # cache (2 to 3 times faster than passes over a whole block); on a GPU the whole block
        step = max(1, SUB_BYTES // (4 * self.width)) if self.device.type == "cpu" else len(chunk)
        values = torch.cat(
            [
                self._row_values(stored[i : i + step], example_id[i : i + step])
                for i in range(0, len(chunk), step)
            ]
        )
        self.means.update(values.double().cpu().numpy(), example_id)
        # |x| in the stored dtype: exact, and float16 halves the work of the partial sort
        if self.sort_on_device:
            median, largest = (t.cpu().numpy() for t in row_median_and_max_torch(stored.abs()))
        else:
            median, largest = sorting.result()
        has_ratio = median > 0
        ratio = largest[has_ratio].astype(np.float64) / median[has_ratio]
        self.ratio.update(ratio[:, None], example_id[has_ratio])
        self.zero_median_rows += int((~has_ratio).sum())
        if len(ratio):
            self.largest_ratio = max(self.largest_ratio, float(ratio.max()))

    def _row_values(self, stored: torch.Tensor, example_id: np.ndarray) -> torch.Tensor:
        """The per-row values of some rows ([rows, metrics], see ``self.means``); the
        per-feature extremes updated with them."""
        x = stored.to(torch.float32)
        mean, m2, kurtosis = row_moments(x)
        if not torch.isfinite(kurtosis).all():
            bad = (~torch.isfinite(kurtosis)).nonzero()[:, 0].cpu()
            first = int(example_id[int(bad[0])])
            if not torch.isfinite(x[bad.to(self.device)]).all():
                bad = (~torch.isfinite(x)).any(dim=1).nonzero()[:, 0].cpu()
                raise StatisticsError(
                    f"{len(bad)} row(s) hold NaN or inf (first of example "
                    f"{int(example_id[int(bad[0])])}); statistics refused"
                )
            if (m2[bad.to(self.device)] == 0).any():
                raise StatisticsError(
                    f"{int((m2 == 0).sum())} row(s) are constant across "
                    f"features (first of example {first}): kurtosis undefined"
                )
            raise StatisticsError(
                f"kurtosis overflows float32 in {len(bad)} row(s) (first of example {first})"
            )
        rotated = torch.stack([row_kurtosis(rotate(x)) for rotate in self.rotations], dim=1)
        mean_square = m2 + mean.square()
        block_max, block_min = (t.cpu().numpy() for t in (x.amax(dim=0), x.amin(dim=0)))
        self.feature_max = np.maximum(self.feature_max, block_max)
        self.feature_min = np.minimum(self.feature_min, block_min)
        return torch.cat(
            [
                torch.stack([kurtosis, rotated.mean(dim=1), mean_square.sqrt(), mean_square], 1),
                rotated,
            ],
            dim=1,
        )

    def results(self, thresholds: list[float], top_features: int) -> list[dict]:
        """Long-form records: metric, setting, value, spread, rows (and feature, for the top
        features)."""
        rows = self.means.total_rows
        if rows == 0:
            raise StatisticsError("no rows to compute statistics from")
        mean, error = self.means.finish(self.average)
        per = "example mean" if self.average == "examples" else "row mean"
        records = []

        def add(metric, setting, value, spread=math.nan, feature=None, rows=rows):
            records.append(
                {
                    "metric": metric,
                    "setting": setting,
                    "value": float(value),
                    "spread": float(spread),
                    "rows": rows,
                    "feature": feature,
                }
            )

        n_rot = len(self.rotations)
        add("kurtosis", "standard basis" + _of(self.average), mean[0], error[0])
        add(
            "rotated_kurtosis",
            f"mean of {n_rot} rotation(s)" + _of(self.average),
            mean[1],
            error[1],
        )
        per_rotation = mean[len(ROW_METRICS) :]
        add(
            "rotated_kurtosis_sd",
            f"sd over {n_rot} rotation(s)",
            per_rotation.std(ddof=1) if n_rot > 1 else math.nan,
        )
        if self.rms == "row_mean":  # the mean of each row's RMS
            add("rms", per, mean[2], error[2])
        else:  # the square root of the mean of the rows' (or examples') mean x^2
            root = math.sqrt(mean[3])
            add("rms", f"root of the {per} square", root, error[3] / (2 * root) if root else 0)
        ratio_rows = rows - self.zero_median_rows
        if ratio_rows:
            ratio_mean, ratio_error = self.ratio.finish(self.average)
            add("max_over_median", per, ratio_mean[0], ratio_error[0], rows=ratio_rows)
            add("max_over_median", "row max", self.largest_ratio, rows=ratio_rows)
        add("max_over_median", "rows with median |x| = 0", self.zero_median_rows)
        magnitude = np.maximum(self.feature_max, -self.feature_min)
        for t in thresholds:
            add("outlier_fraction", f"signed x > {t:g}", float((self.feature_max > t).mean()))
            add("outlier_fraction", f"magnitude |x| > {t:g}", float((magnitude > t).mean()))
        top = np.argsort(-magnitude, kind="stable")[:top_features]
        for rank, feature in enumerate(top.tolist(), start=1):
            add("top_feature_max_abs", f"rank {rank}", magnitude[feature], feature=feature)
        return records
