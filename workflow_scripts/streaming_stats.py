"""Statistics of one read-out point, accumulated in one streaming pass over chunks of rows.

Each statistic is one entry of the registry :data:`STATISTICS`, a :class:`Statistic` that says
what it takes from each block of rows, how it folds that into its state, and what it reports.
The entries, in the order of their records:
  kurtosis            Pearson kurtosis of each row across its features (Gaussian: 3), averaged;
  rotated_kurtosis    the same after a fixed random orthogonal rotation, averaged over the
                      rotations (``rotated_kurtosis_sd`` is the spread of the per-rotation means);
  rms                 root mean square of each row, averaged (or the root of the mean square);
  max_over_median     each row's largest |x| over its median |x| (massive activations); rows
                      whose median |x| is 0 have no ratio and are counted apart;
  outliers            the fraction of features whose largest x (or |x|) passes a threshold;
  top_features        the features of largest |x|.
Per-row values are averaged over rows (or over each example's rows, then over examples), with a
standard error over examples: the rows of one example are not independent, so the error is
cluster-robust with examples as clusters. Memory is bounded by the chunk: the per-example sums
are closed as soon as the example's rows have passed (the rows of an example are contiguous, as
extraction writes them).
"""

from __future__ import annotations

import contextlib
import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from workflow_scripts.rotations import DenseRotation
from workflow_scripts.stage import InputError

SUB_BYTES = 3 << 19  # float32 bytes of the rows one CPU thread computes at once
AVERAGES = ("rows", "examples")  # over rows; or over each example's rows, then over examples
RMS_DEFINITIONS = ("row_mean", "root_mean_square")


class StatisticsError(InputError):
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


class Rows:
    """A block of rows of one read-out point, as the statistics see it: ``array`` as stored
    (numpy, [rows, width]), ``stored`` the same on the device, ``x`` in float32 on the device,
    ``example_id`` of each row, and what several statistics share, computed once: each row's
    ``mean``, second central moment ``m2`` and ``kurtosis``, and :attr:`feature_extremes`. Rows
    without a kurtosis (NaN or inf, constant, overflowing) are refused here, whatever the
    statistics."""

    def __init__(self, array: np.ndarray, example_id: np.ndarray, device: torch.device):
        self.array, self.example_id, self.device = array, example_id, device
        self.stored = torch.from_numpy(array).to(device)
        self.x = self.stored.to(torch.float32)
        self.mean, self.m2, self.kurtosis = row_moments(self.x)
        if not torch.isfinite(self.kurtosis).all():
            self._refuse()

    @functools.cached_property
    def feature_extremes(self) -> tuple[np.ndarray, np.ndarray]:
        """The largest and the smallest value of each feature over these rows (float32)."""
        return self.x.amax(dim=0).cpu().numpy(), self.x.amin(dim=0).cpu().numpy()

    def _refuse(self):
        """Raise the StatisticsError that says why some rows have no kurtosis."""
        x, m2, kurtosis, example_id = self.x, self.m2, self.kurtosis, self.example_id
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


class Report:
    """The records of one read-out point, as the statistics add them, and what they are made
    from: ``rows`` (how many rows were seen), ``mean`` and ``error`` (the mean and standard error
    of each per-row value, by name), ``average`` (see :data:`AVERAGES`), ``thresholds``,
    ``top_features``, and for settings' names ``per`` ("row mean" or "example mean") and ``of``
    (", example mean", or nothing for the default)."""

    def __init__(self, rows, mean, error, average, thresholds, top_features):
        self.rows, self.mean, self.error, self.average = rows, mean, error, average
        self.thresholds, self.top_features = thresholds, top_features
        self.per = "example mean" if average == "examples" else "row mean"
        self.of = ", example mean" if average == "examples" else ""
        self.records = []

    def add(self, metric, setting, value, spread=math.nan, rows=None, feature=None) -> None:
        """Add one record; ``rows`` defaults to every row seen."""
        self.records.append(
            {
                "metric": metric,
                "setting": setting,
                "value": float(value),
                "spread": float(spread),
                "rows": self.rows if rows is None else rows,
                "feature": feature,
            }
        )

    def add_mean(self, metric: str, setting: str, name: str) -> None:
        """Add the mean of the per-row value ``name``, with its standard error as the spread."""
        self.add(metric, setting, self.mean[name], self.error[name])


class Statistic:
    """One statistic of a read-out point. Made once per read-out point, with its
    :class:`LayerStatistics` as ``self.layer`` (``width``, ``rotations``, ``device``,
    ``average``, ``rms``, ``sort_on_device``). For each block of rows (:class:`Rows`), in a
    worker thread, several blocks at once, so these two must not change ``self``:

      row_values(rows)  per-row values to average over rows (or examples), by name:
                        ``{name: float32 tensor [rows]}``; the means and standard errors reach
                        ``report`` under the same names (names are shared by every statistic);
      block(rows)       anything else to keep from the rows (numpy arrays, small);

    then, in the main thread, in row order:

      merge(parts, example_id)  fold the ``block`` results of consecutive blocks into the state;

    and at the end:

      report(out)       add the records to ``out`` (:class:`Report`).

    Add one to :data:`STATISTICS` with :func:`register`."""

    name = ""  # the key in STATISTICS

    def __init__(self, layer: LayerStatistics):
        self.layer = layer

    def row_values(self, rows: Rows) -> dict[str, torch.Tensor]:
        """Per-row values of ``rows`` to average, by name (none by default)."""
        return {}

    def block(self, rows: Rows):
        """What to keep of ``rows`` for ``merge`` (nothing by default)."""
        return None

    def merge(self, parts: list, example_id: np.ndarray) -> None:
        """Fold ``parts`` (``block`` of consecutive blocks, in row order) into the state;
        ``example_id``: of all their rows."""

    def report(self, out: Report) -> None:
        """Add this statistic's records to ``out``."""
        raise NotImplementedError


STATISTICS: dict[str, type[Statistic]] = {}  # the registry: name -> Statistic, in record order


def register(statistic: type[Statistic]) -> type[Statistic]:
    """Add ``statistic`` to :data:`STATISTICS`, after the others (so are its records)."""
    if not statistic.name or statistic.name in STATISTICS:
        raise ValueError(f"a statistic needs a name of its own, not {statistic.name!r}")
    STATISTICS[statistic.name] = statistic
    return statistic


@register
class Kurtosis(Statistic):
    """kurtosis: Pearson kurtosis of each row across its features (biased moments, Gaussian:
    3), averaged."""

    name = "kurtosis"

    def row_values(self, rows):
        return {"kurtosis": rows.kurtosis}

    def report(self, out):
        out.add_mean("kurtosis", "standard basis" + out.of, "kurtosis")


@register
class RotatedKurtosis(Statistic):
    """rotated_kurtosis: each row's kurtosis after each of the layer's rotations, averaged over
    the rotations, then over rows; rotated_kurtosis_sd: the standard deviation over rotations of
    their mean kurtosis (NaN for one rotation)."""

    name = "rotated_kurtosis"

    def row_values(self, rows):
        rotated = torch.stack([row_kurtosis(rotate(rows.x)) for rotate in self.layer.rotations], 1)
        values = {"rotated_kurtosis": rotated.mean(dim=1)}
        for r in range(rotated.shape[1]):
            values[f"rotated_kurtosis {r}"] = rotated[:, r]
        return values

    def report(self, out):
        n = len(self.layer.rotations)
        out.add_mean("rotated_kurtosis", f"mean of {n} rotation(s)" + out.of, "rotated_kurtosis")
        per_rotation = np.array([out.mean[f"rotated_kurtosis {r}"] for r in range(n)])
        sd = per_rotation.std(ddof=1) if n > 1 else math.nan
        out.add("rotated_kurtosis_sd", f"sd over {n} rotation(s)", sd)


@register
class Rms(Statistic):
    """rms: with ``rms="row_mean"`` the mean of each row's root mean square; with
    ``"root_mean_square"`` the square root of the mean of each row's (or example's) mean x^2,
    its error carried through the root."""

    name = "rms"

    def row_values(self, rows):
        mean_square = rows.m2 + rows.mean.square()
        return {"rms": mean_square.sqrt(), "mean_square": mean_square}

    def report(self, out):
        if self.layer.rms == "row_mean":
            out.add_mean("rms", out.per, "rms")
        else:
            root = math.sqrt(out.mean["mean_square"])
            spread = out.error["mean_square"] / (2 * root) if root else 0
            out.add("rms", f"root of the {out.per} square", root, spread)


@register
class MaxOverMedian(Statistic):
    """max_over_median (massive activations): each row's largest |x| over its median |x|,
    averaged, and its largest; rows whose median |x| is 0 have no ratio and are counted apart."""

    name = "max_over_median"

    def __init__(self, layer):
        super().__init__(layer)
        self.ratio = ClusterMeans(1)
        self.largest = -math.inf
        self.zero_median_rows = 0

    def block(self, rows):
        # |x| in the stored dtype: exact, and float16 halves the work of the selection
        if self.layer.sort_on_device:
            return tuple(t.cpu().numpy() for t in row_median_and_max_torch(rows.stored.abs()))
        return row_median_and_max(np.abs(rows.array))

    def merge(self, parts, example_id):
        median, largest = (np.concatenate(p) for p in zip(*parts))
        has_ratio = median > 0
        ratio = largest[has_ratio].astype(np.float64) / median[has_ratio]
        self.ratio.update(ratio[:, None], example_id[has_ratio])
        self.zero_median_rows += int((~has_ratio).sum())
        if len(ratio):
            self.largest = max(self.largest, float(ratio.max()))

    def report(self, out):
        rows = out.rows - self.zero_median_rows
        if rows:
            mean, error = self.ratio.finish(out.average)
            out.add("max_over_median", out.per, mean[0], error[0], rows=rows)
            out.add("max_over_median", "row max", self.largest, rows=rows)
        out.add("max_over_median", "rows with median |x| = 0", self.zero_median_rows)


class FeatureExtremes(Statistic):
    """The largest (``max``) and smallest (``min``) value of each feature over every row: the
    state of the per-feature statistics, which differ only in their report."""

    def __init__(self, layer):
        super().__init__(layer)
        self.max = np.full(layer.width, -np.inf, np.float32)
        self.min = np.full(layer.width, np.inf, np.float32)

    def block(self, rows):
        return rows.feature_extremes

    def merge(self, parts, example_id):
        maxima, minima = zip(*parts)
        self.max = np.max([self.max, *maxima], axis=0)
        self.min = np.min([self.min, *minima], axis=0)

    def magnitude(self) -> np.ndarray:
        """The largest |x| of each feature."""
        return np.maximum(self.max, -self.min)


@register
class Outliers(FeatureExtremes):
    """outlier_fraction: the fraction of features whose activation passes each threshold in at
    least one row, signed (``x > t``, as the study) and by magnitude (``|x| > t``)."""

    name = "outliers"

    def report(self, out):
        magnitude = self.magnitude()
        for t in out.thresholds:
            out.add("outlier_fraction", f"signed x > {t:g}", float((self.max > t).mean()))
            out.add("outlier_fraction", f"magnitude |x| > {t:g}", float((magnitude > t).mean()))


@register
class TopFeatures(FeatureExtremes):
    """top_feature_max_abs: the ``top_features`` features of largest |x|, by rank, with their
    index in ``feature`` (ties in index order)."""

    name = "top_features"

    def report(self, out):
        magnitude = self.magnitude()
        top = np.argsort(-magnitude, kind="stable")[: out.top_features]
        for rank, feature in enumerate(top.tolist(), start=1):
            out.add("top_feature_max_abs", f"rank {rank}", magnitude[feature], feature=feature)


class LayerStatistics:
    """Accumulates the registered statistics of one read-out point over chunks of rows."""

    def __init__(
        self,
        width: int,
        rotations: list,
        device: str | torch.device = "cpu",
        sort_on_device: bool | None = None,
        average: str = "rows",
        rms: str = "row_mean",
        statistics: list[str] | None = None,
    ):
        """``rotations``: callables on a [rows, width] float32 tensor with a ``.to(device)``
        (:func:`rotations.make_rotation`), or orthogonal matrices (applied as ``x @ q``);
        ``device``: where the moments, rotations and extremes are computed (the sums are
        kept in float64 on the host); ``sort_on_device``: the median and maximum of |x| with
        torch on ``device`` rather than numpy's selection (default: on a GPU); ``statistics``:
        the names of the registered statistics to compute (default: all, in the registry's
        order). On the CPU the rows are shared out among as many threads as torch was given
        when this was made."""
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
        names = list(STATISTICS) if statistics is None else statistics
        self.statistics = [STATISTICS[name](self) for name in names]
        self.rows = 0
        self.row_names: tuple[str, ...] = ()  # the per-row values' names, as in self.means
        self.means: ClusterMeans | None = None  # made from the first rows

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
                done = list(_pool(self.threads).map(lambda part: self._block(*part), parts))
        else:  # the whole block on the device
            done = [self._block(chunk, example_id)]
        names, values, kept = zip(*done)
        if self.means is None:
            self.row_names, self.means = names[0], ClusterMeans(len(names[0]))
        self.means.update(np.concatenate(values), example_id)
        for statistic, parts in zip(self.statistics, zip(*kept)):
            statistic.merge(list(parts), example_id)
        self.rows += len(chunk)

    def _block(self, array: np.ndarray, example_id: np.ndarray):
        """Of some rows: the names of the statistics' per-row values, those values ([rows,
        values] in float64), and what each statistic keeps of the rows."""
        rows = Rows(array, example_id, self.device)
        values = {}
        for statistic in self.statistics:
            for name, value in statistic.row_values(rows).items():
                if name in values:
                    raise ValueError(f"two statistics name a per-row value {name!r}")
                values[name] = value
        if values:
            columns = torch.stack(list(values.values()), dim=1).double().cpu().numpy()
        else:
            columns = np.zeros((len(array), 0))
        return tuple(values), columns, [statistic.block(rows) for statistic in self.statistics]

    def results(self, thresholds: list[float], top_features: int) -> list[dict]:
        """Long-form records: metric, setting, value, spread, rows (and feature, for the top
        features), each statistic's in the order of ``self.statistics``."""
        if self.rows == 0:
            raise StatisticsError("no rows to compute statistics from")
        mean, error = self.means.finish(self.average)
        out = Report(
            self.rows,
            dict(zip(self.row_names, mean)),
            dict(zip(self.row_names, error)),
            self.average,
            thresholds,
            top_features,
        )
        for statistic in self.statistics:
            statistic.report(out)
        return out.records
