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

import contextlib
import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from workflow_scripts.rotations import DenseRotation

SUB_BYTES = 3 << 19  # float32 bytes of the rows one CPU thread computes at once
ROW_METRICS = ("kurtosis", "rotated_kurtosis", "rms", "mean_square")
AVERAGES = ("rows", "examples")  # over rows; or over each example's rows, then over examples
RMS_DEFINITIONS = ("row_mean", "root_mean_square")


def _of(average: str) -> str:
    """How a per-row value was averaged, for a setting's name (nothing for the default)."""
    return ", example mean" if average == "examples" else ""


class StatisticsError(ValueError):
    """Activations that statistics cannot be computed from: say why, never a wrong number."""


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


@contextlib.contextmanager
def _torch_threads(threads: int):
    """torch's intra-op threads set to ``threads`` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _simd_select_16() -> bool:
    """Whether numpy selects and sorts 16-bit integers with its AVX-512 kernels (x86-simd-sort,
    on CPUs with AVX512_ICL): there a partition of a float16 row's bit patterns is about five
    times faster than a radix sort; without them, about four times slower."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        return False
    return bool(__cpu_features__.get("AVX512_ICL"))


SIMD_SELECT_16 = _simd_select_16()


def row_median_and_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median (the mean of the two middle values for an even width, as numpy's) and maximum of
    every row of ``x`` >= 0, in float32, exact. float16 rows are ordered by their bit patterns
    (uint16: the same order for values >= 0). The rows are partitioned about their lower middle
    value (numpy's SIMD selection); the upper middle value and the maximum are the smallest and
    largest of what lies above it. float16 rows are radix-sorted instead where numpy has no
    SIMD selection of 16-bit integers (:data:`SIMD_SELECT_16`)."""
    width = x.shape[1]
    k = (width - 1) // 2
    keys = x.view(np.uint16) if x.dtype == np.float16 else x
    if keys.dtype == np.uint16 and not SIMD_SELECT_16:
        parted = np.sort(keys, axis=1, kind="stable")
    else:
        parted = np.partition(keys, k, axis=1)
    above = parted[:, k + 1 :]  # reduced as keys: numpy's float16 reductions are slow

    def values(keys: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(keys).view(x.dtype).astype(np.float32)

    lower = values(parted[:, k])
    if width == 1:
        return lower, lower
    median = lower if width % 2 else (lower + values(above.min(axis=1))) / 2
    return median, np.maximum(lower, values(above.max(axis=1)))


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
        (:func:`rotations.make_rotation`), or orthogonal matrices (applied as ``x @ q``);
        ``device``: where the moments, rotations and extremes are computed (the sums are
        kept in float64 on the host); ``sort_on_device``: the median and maximum of |x| with
        torch on ``device`` rather than numpy's selection (default: on a GPU). On the CPU the rows
        are shared out among as many threads as torch was given when this was made."""
        if average not in AVERAGES or rms not in RMS_DEFINITIONS:
            raise ValueError(f"average {average!r}, rms {rms!r}: see AVERAGES, RMS_DEFINITIONS")
        self.width, self.average, self.rms = width, average, rms
        self.threads = max(1, torch.get_num_threads())  # the job's thread count
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
        if self.device.type == "cpu":
            # a few hundred rows at a time, every statistic of them in one thread (torch at one
            # thread each), so that their many passes stay in the cache, and the job's threads
            # each take their own rows
            step = max(1, SUB_BYTES // (4 * self.width))
            parts = [
                (chunk[i : i + step], example_id[i : i + step]) for i in range(0, len(chunk), step)
            ]
            with _torch_threads(1):
                done = list(_pool(self.threads).map(lambda part: self._rows(*part), parts))
        else:  # the whole block on the device
            done = [self._rows(chunk, example_id)]
        values, median, largest, maxima, minima = zip(*done)
        self.means.update(np.concatenate(values), example_id)
        self.feature_max = np.max([self.feature_max, *maxima], axis=0)
        self.feature_min = np.min([self.feature_min, *minima], axis=0)
        median, largest = np.concatenate(median), np.concatenate(largest)
        has_ratio = median > 0
        ratio = largest[has_ratio].astype(np.float64) / median[has_ratio]
        self.ratio.update(ratio[:, None], example_id[has_ratio])
        self.zero_median_rows += int((~has_ratio).sum())
        if len(ratio):
            self.largest_ratio = max(self.largest_ratio, float(ratio.max()))

    def _rows(self, rows: np.ndarray, example_id: np.ndarray) -> tuple[np.ndarray, ...]:
        """Of some rows: their per-row values ([rows, metrics] in float64, see ``self.means``),
        median and maximum of |x|, and the per-feature maximum and minimum."""
        stored = torch.from_numpy(rows).to(self.device)
        x = stored.to(torch.float32)
        mean, m2, kurtosis = row_moments(x)
        if not torch.isfinite(kurtosis).all():
            self._refuse(x, m2, kurtosis, example_id)
        rotated = torch.stack([row_kurtosis(rotate(x)) for rotate in self.rotations], dim=1)
        mean_square = m2 + mean.square()
        values = torch.cat(
            [
                torch.stack([kurtosis, rotated.mean(dim=1), mean_square.sqrt(), mean_square], 1),
                rotated,
            ],
            dim=1,
        )
        # |x| in the stored dtype: exact, and float16 halves the work of the selection
        if self.sort_on_device:
            median, largest = (t.cpu().numpy() for t in row_median_and_max_torch(stored.abs()))
        else:
            median, largest = row_median_and_max(np.abs(rows))
        extremes = (t.cpu().numpy() for t in (x.amax(dim=0), x.amin(dim=0)))
        return values.double().cpu().numpy(), median, largest, *extremes

    def _refuse(self, x, m2, kurtosis, example_id: np.ndarray):
        """Raise the StatisticsError that says why some rows have no kurtosis."""
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
