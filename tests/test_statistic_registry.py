"""The registry of statistics: each registered statistic computed on its own against an
independent numpy float64 / scipy reference, and a throwaway statistic registered, reported and
removed."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import yaml

from workflow_scripts import streaming_stats
from workflow_scripts.rotations import random_rotation
from workflow_scripts.streaming_stats import STATISTICS, LayerStatistics, Statistic, register

WIDTH = 40
THRESHOLDS = [2.5, 10.0]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 37 rows, so that every statistic merges several blocks per update."""
    monkeypatch.setattr(streaming_stats, "SUB_BYTES", 4 * WIDTH * 37)


def layer(seed: int = 0, rows: int = 700, relu: bool = False):
    """float16 rows with two outlier features, in examples of 1 to 12 contiguous rows; with
    ``relu``, most of some rows are exactly 0 (their median |x| is 0)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, WIDTH))
    x[:, [3, 17]] *= 25
    if relu:
        x = np.maximum(x, 0)
        x[:, 0] += 1.0  # no constant rows
        x[::11, 1:] = 0.0
        x[::11, 1] = 0.5
    ids = np.repeat(np.arange(rows), rng.integers(1, 13, size=rows))[:rows]
    return x.astype(np.float16), ids


def rotations(n: int) -> list[np.ndarray]:
    return [random_rotation(WIDTH, 0, 1, r) for r in range(n)]


def alone(name, x, ids, n_rotations=1, **options) -> pd.DataFrame:
    """The records of the registered statistic ``name`` computed on its own, the rows given in
    uneven chunks."""
    return pd.DataFrame(records(x, ids, n_rotations, statistics=[name], **options))


def records(x, ids, n_rotations=1, **options) -> list[dict]:
    """The records of LayerStatistics (``options``: its keyword arguments) over ``x``, the rows
    given in uneven chunks."""
    stats = LayerStatistics(WIDTH, rotations(n_rotations), **options)
    for part in np.array_split(np.arange(len(x)), [5, 6, 300]):
        stats.update(x[part], ids[part])
    return stats.results(THRESHOLDS, 5)


def clustered(values: np.ndarray, ids: np.ndarray, average: str) -> tuple[float, float]:
    """The mean of per-row values and its standard error over examples, in float64: over rows
    with the cluster-robust error, or over each example's mean with their standard error."""
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=values)
    g = len(counts)
    if average == "examples":
        means = sums / counts
        return means.mean(), means.std(ddof=1) / np.sqrt(g)
    mu = values.mean()
    return mu, np.sqrt(((sums - counts * mu) ** 2).sum() / len(values) ** 2 * g / (g - 1))


def kurtosis(x: np.ndarray) -> np.ndarray:
    return scipy.stats.kurtosis(x, axis=1, fisher=False, bias=True)


def only(frame: pd.DataFrame, metric: str, setting: str) -> pd.Series:
    rows = frame[(frame["metric"] == metric) & (frame["setting"] == setting)]
    assert len(rows) == 1, frame
    return rows.iloc[0]


def test_the_registry_in_record_order():
    assert list(STATISTICS) == [
        "kurtosis",
        "rotated_kurtosis",
        "rms",
        "max_over_median",
        "outliers",
        "top_features",
    ]


@pytest.mark.parametrize("average", ["rows", "examples"])
def test_kurtosis_alone(average):
    x, ids = layer(1)
    frame = alone("kurtosis", x, ids, average=average)
    suffix = ", example mean" if average == "examples" else ""
    assert frame[["metric", "setting"]].values.tolist() == [["kurtosis", "standard basis" + suffix]]
    mean, error = clustered(kurtosis(x.astype(np.float64)), ids, average)
    np.testing.assert_allclose(frame["value"], mean, rtol=1e-5)
    np.testing.assert_allclose(frame["spread"], error, rtol=1e-4)
    assert frame["rows"].tolist() == [len(x)]


@pytest.mark.parametrize("average", ["rows", "examples"])
def test_rotated_kurtosis_alone(average):
    x, ids = layer(2)
    frame = alone("rotated_kurtosis", x, ids, n_rotations=3, average=average)
    suffix = ", example mean" if average == "examples" else ""
    assert frame[["metric", "setting"]].values.tolist() == [
        ["rotated_kurtosis", "mean of 3 rotation(s)" + suffix],
        ["rotated_kurtosis_sd", "sd over 3 rotation(s)"],
    ]
    x64 = x.astype(np.float64)
    per_row = np.stack([kurtosis(x64 @ q.astype(np.float64)) for q in rotations(3)], axis=1)
    mean, error = clustered(per_row.mean(axis=1), ids, average)
    rotated = only(frame, "rotated_kurtosis", "mean of 3 rotation(s)" + suffix)
    np.testing.assert_allclose([rotated["value"], rotated["spread"]], [mean, error], rtol=1e-4)
    per_rotation = [clustered(per_row[:, r], ids, average)[0] for r in range(3)]
    sd = only(frame, "rotated_kurtosis_sd", "sd over 3 rotation(s)")
    np.testing.assert_allclose(sd["value"], np.std(per_rotation, ddof=1), rtol=1e-3)
    assert math.isnan(sd["spread"])
    one = alone("rotated_kurtosis", x, ids, n_rotations=1)
    assert math.isnan(only(one, "rotated_kurtosis_sd", "sd over 1 rotation(s)")["value"])


@pytest.mark.parametrize("average", ["rows", "examples"])
@pytest.mark.parametrize("rms", ["row_mean", "root_mean_square"])
def test_rms_alone_in_both_definitions(average, rms):
    x, ids = layer(3)
    frame = alone("rms", x, ids, average=average, rms=rms)
    per = "example mean" if average == "examples" else "row mean"
    mean_square = (x.astype(np.float64) ** 2).mean(axis=1)
    if rms == "row_mean":
        setting = per
        value, spread = clustered(np.sqrt(mean_square), ids, average)
    else:
        setting = f"root of the {per} square"
        mean, error = clustered(mean_square, ids, average)
        value, spread = np.sqrt(mean), error / (2 * np.sqrt(mean))
    assert frame[["metric", "setting"]].values.tolist() == [["rms", setting]]
    np.testing.assert_allclose([frame["value"][0], frame["spread"][0]], [value, spread], rtol=1e-5)


@pytest.mark.parametrize("sort_on_device", [False, True], ids=["numpy", "torch"])
@pytest.mark.parametrize("average", ["rows", "examples"])
def test_max_over_median_alone(sort_on_device, average):
    x, ids = layer(4, relu=True)
    frame = alone("max_over_median", x, ids, average=average, sort_on_device=sort_on_device)
    magnitude = np.abs(x.astype(np.float64))
    median, largest = np.median(magnitude, axis=1), magnitude.max(axis=1)
    kept = median > 0
    ratio = largest[kept] / median[kept]
    mean, error = clustered(ratio, ids[kept], average)
    per = "example mean" if average == "examples" else "row mean"
    assert frame[["metric", "setting"]].values.tolist() == [
        ["max_over_median", per],
        ["max_over_median", "row max"],
        ["max_over_median", "rows with median |x| = 0"],
    ]
    np.testing.assert_allclose(frame["value"][:2], [mean, ratio.max()], rtol=1e-12)
    np.testing.assert_allclose(frame["spread"][0], error, rtol=1e-9)
    assert frame["value"][2] == (~kept).sum() > 0
    assert frame["rows"].tolist() == [kept.sum(), kept.sum(), len(x)]


def test_outliers_alone_signed_and_by_magnitude():
    x, ids = layer(5)
    x[10, 5], x[20, 6] = 11.0, -12.0  # past 10 signed; past 10 only by magnitude
    frame = alone("outliers", x, ids)
    x64 = x.astype(np.float64)
    expected = []
    for t in THRESHOLDS:
        expected.append(["outlier_fraction", f"signed x > {t:g}", (x64 > t).any(axis=0).mean()])
        magnitude = (np.abs(x64) > t).any(axis=0).mean()
        expected.append(["outlier_fraction", f"magnitude |x| > {t:g}", magnitude])
    assert frame[["metric", "setting", "value"]].values.tolist() == expected
    assert (
        only(frame, "outlier_fraction", "magnitude |x| > 10")["value"]
        > only(frame, "outlier_fraction", "signed x > 10")["value"]
    )
    assert frame["feature"].isna().all() and (frame["rows"] == len(x)).all()


def test_top_features_alone():
    x, ids = layer(6)
    x[:, [3, 17]] = 0.0
    x[7, 9], x[8, 2], x[9, 30], x[11, 31] = -90.0, 80.0, 70.0, -70.0  # 30 and 31 tie
    frame = alone("top_features", x, ids)
    magnitude = np.abs(x.astype(np.float64)).max(axis=0)
    top = np.argsort(-magnitude, kind="stable")[:5]
    assert top[:4].tolist() == [9, 2, 30, 31]
    assert frame["metric"].eq("top_feature_max_abs").all()
    assert frame["setting"].tolist() == [f"rank {r}" for r in range(1, 6)]
    assert frame["feature"].tolist() == top.tolist()
    np.testing.assert_array_equal(frame["value"], magnitude[top])


def test_each_statistic_alone_gives_its_records_of_the_full_run():
    """Every statistic's records are its own: computed alone, they are those of the full run
    (up to the float64 rounding of sums, which depends on how many per-row values there are)."""
    x, ids = layer(7, relu=True)
    expected = pd.DataFrame(records(x, ids, 2))
    got = pd.DataFrame([r for name in STATISTICS for r in records(x, ids, 2, statistics=[name])])
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-12)


class MaxAbs(Statistic):
    """A throwaway statistic: each row's largest |x|, averaged (per-row values), and the
    largest |x| of all (its own state, merged over blocks)."""

    name = "max_abs"

    def __init__(self, layer):
        super().__init__(layer)
        self.largest = 0.0

    def row_values(self, rows):
        return {"max_abs": rows.x.abs().amax(dim=1)}

    def block(self, rows):
        return float(rows.x.abs().max())

    def merge(self, parts, example_id):
        self.largest = max(self.largest, *parts)

    def report(self, out):
        out.add_mean("max_abs", out.per, "max_abs")
        out.add("max_abs", "largest", self.largest)


@pytest.fixture
def max_abs_registered():
    before = list(STATISTICS)
    register(MaxAbs)
    try:
        yield
    finally:
        del STATISTICS["max_abs"]
    assert list(STATISTICS) == before


@pytest.mark.parametrize("average", ["rows", "examples"])
def test_a_registered_statistic_appears_in_the_results(max_abs_registered, average):
    x, ids = layer(8)
    expected = records(x, ids, 2, average=average, statistics=list(STATISTICS)[:-1])
    got = records(x, ids, 2, average=average)
    assert got[: len(expected)] == expected  # the others' records, bit for bit
    per = "example mean" if average == "examples" else "row mean"
    mean, error = clustered(np.abs(x.astype(np.float64)).max(axis=1), ids, average)
    added = got[len(expected) :]
    assert [(r["metric"], r["setting"], r["rows"]) for r in added] == [
        ("max_abs", per, len(x)),
        ("max_abs", "largest", len(x)),
    ]
    np.testing.assert_allclose([added[0]["value"], added[0]["spread"]], [mean, error], rtol=1e-9)
    assert added[1]["value"] == np.abs(x.astype(np.float64)).max()


def test_a_name_twice_is_refused(max_abs_registered):
    class Again(MaxAbs):
        pass

    with pytest.raises(ValueError, match="a name of its own"):
        register(Again)

    class SameRowValue(MaxAbs):
        name = "max_abs_again"

    stats = LayerStatistics(WIDTH, rotations(1), statistics=["max_abs"])
    stats.statistics.append(SameRowValue(stats))
    with pytest.raises(ValueError, match="two statistics name a per-row value 'max_abs'"):
        stats.update(*layer(9, rows=20))


def test_nan_rows_are_refused_whatever_the_statistics():
    x, ids = layer(10, rows=50)
    x[30, 4] = np.nan
    stats = LayerStatistics(WIDTH, rotations(1), statistics=["outliers"])
    with pytest.raises(streaming_stats.StatisticsError, match="hold NaN or inf"):
        stats.update(x, ids)


def test_the_rows_a_statistic_sees():
    x, ids = layer(11, rows=30)
    rows = streaming_stats.Rows(x, ids, torch.device("cpu"))
    x64 = x.astype(np.float64)
    assert rows.stored.dtype == torch.float16 and rows.x.dtype == torch.float32
    np.testing.assert_allclose(rows.mean.numpy(), x64.mean(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows.m2.numpy(), x64.var(axis=1), rtol=1e-5)
    np.testing.assert_allclose(rows.kurtosis.numpy(), kurtosis(x64), rtol=1e-5)
    largest, smallest = rows.feature_extremes
    np.testing.assert_array_equal(largest, x64.max(axis=0))
    np.testing.assert_array_equal(smallest, x64.min(axis=0))


THROWAWAY_ENTRY = '''

@register
class ThrowawayMaxAbs(Statistic):
    """throwaway_max_abs: each row's largest |x|, averaged over rows."""

    name = "throwaway_max_abs"

    def row_values(self, rows):
        return {"throwaway_max_abs": rows.x.abs().amax(dim=1)}

    def report(self, out):
        out.add_mean("throwaway_max_abs", out.per, "throwaway_max_abs")
'''


@pytest.mark.workflow
def test_a_new_statistic_is_one_entry_through_the_whole_workflow(tmp_path):
    """One entry appended to streaming_stats.py in a copy of the workflow: layer_stats computes
    it, merge_stats and the statistics table carry it, equal to numpy on the stored stream."""
    from support import copy_workflow, load_config, snakemake

    from workflow_scripts.activations import open_shard

    checkout, workdir = tmp_path / "checkout", tmp_path / "work"
    copy_workflow(checkout)
    with open(checkout / "workflow_scripts/streaming_stats.py", "a") as handle:
        handle.write(THROWAWAY_ENTRY)
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(load_config("tiny")))
    target = "results/stats/resnet-tiny/shapes.parquet"
    result = snakemake(workdir, target, snakefile=checkout / "Snakefile", PYTHONPATH=str(checkout))
    assert result.returncode == 0, result.stderr[-4000:]
    frame = pd.read_parquet(workdir / target)
    found = frame[frame["metric"] == "throwaway_max_abs"].set_index("layer")["value"]
    assert len(found) == frame["layer"].nunique()  # every read-out point
    shard = open_shard(workdir / "results/activations/resnet-tiny/shapes/shard-0.zarr")
    for layer, value in found.items():
        x = shard[f"layer-{layer}"][:].astype(np.float64)
        assert value == pytest.approx(np.abs(x).max(axis=1).mean(), rel=1e-5)
