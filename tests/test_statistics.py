"""Per-layer statistics against independent references (scipy, numpy in float64), their
invariances, and bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from support import stats_options

from workflow_scripts import streaming_stats
from workflow_scripts.activations import ShardWriter
from workflow_scripts.atomic import write_parquet
from workflow_scripts.layer_stats import compute
from workflow_scripts.merge_stats import merge
from workflow_scripts.models.adapter import Readout
from workflow_scripts.rotations import random_rotation
from workflow_scripts.streaming_stats import (
    ClusterMeans,
    LayerStatistics,
    StatisticsError,
    row_median_and_max,
)

OPTIONS = stats_options(include_padding=False, rotations=1, seed=0, top_features=3)


def write_shard(
    path, layers, example_id, is_padding=None, dtype="float16", chunk_rows=64, chunks_per_shard=2
):
    rows = len(example_id)
    readouts = [Readout(k, 0, k, f"block.{k}", x.shape[1]) for k, x in enumerate(layers)]
    writer = ShardWriter(path, readouts, rows, dtype, chunk_rows, chunks_per_shard)
    padding = np.zeros(rows, bool) if is_padding is None else is_padding
    writer.append([x.astype(dtype) for x in layers], example_id, np.zeros(rows, np.int32), padding)
    writer.close({"readouts": [r.as_dict() for r in readouts]})
    return path


def value(frame, metric, setting=None):
    rows = frame[(frame["metric"] == metric) & ((frame["setting"] == setting) if setting else True)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def heavy_tailed(rng, rows, width, outliers=(3, 17), scale=300.0):
    x = rng.standard_normal((rows, width))
    x[:, list(outliers)] *= scale  # a privileged basis: two outlier features
    return x


def test_kurtosis_rms_and_ratio_against_scipy_and_numpy_float64(tmp_path):
    rng = np.random.default_rng(0)
    x = heavy_tailed(rng, 500, 48).astype(np.float16)  # outliers near float16's range
    x[7, 5] = 60000.0
    ids = np.repeat(np.arange(100), 5)
    frame = compute([write_shard(tmp_path / "s.zarr", [x], ids)], 0, [10.0], OPTIONS)
    x64 = x.astype(np.float64)
    reference = scipy.stats.kurtosis(x64, axis=1, fisher=False).mean()
    np.testing.assert_allclose(value(frame, "kurtosis")["value"], reference, rtol=1e-4)
    rms = np.sqrt((x64**2).mean(axis=1)).mean()
    np.testing.assert_allclose(value(frame, "rms")["value"], rms, rtol=1e-4)
    ratio = np.abs(x64).max(axis=1) / np.median(np.abs(x64), axis=1)
    np.testing.assert_allclose(
        value(frame, "max_over_median", "row mean")["value"], ratio.mean(), rtol=1e-4
    )
    np.testing.assert_allclose(
        value(frame, "max_over_median", "row max")["value"], ratio.max(), rtol=1e-4
    )
    q = random_rotation(48, 0, 0, 0).astype(np.float64)
    rotated = scipy.stats.kurtosis(x64 @ q, axis=1, fisher=False).mean()
    np.testing.assert_allclose(value(frame, "rotated_kurtosis")["value"], rotated, rtol=1e-4)
    assert (frame["rows"] == 500).all()


def test_outliers_signed_and_by_magnitude_against_numpy(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 40))
    x[3, 0], x[9, 1], x[11, 2], x[12, 2] = 12.0, -15.0, 5.0, -11.0
    frame = compute(
        [write_shard(tmp_path / "s.zarr", [x], np.arange(200), dtype="float32")],
        0,
        [4.5, 10.0],
        OPTIONS,
    )
    for t in (4.5, 10.0):
        signed = (x > t).any(axis=0).mean()
        magnitude = (np.abs(x) > t).any(axis=0).mean()
        assert value(frame, "outlier_fraction", f"signed x > {t:g}")["value"] == pytest.approx(
            signed
        )
        assert value(frame, "outlier_fraction", f"magnitude |x| > {t:g}")["value"] == pytest.approx(
            magnitude
        )
    assert value(frame, "outlier_fraction", "signed x > 10")["value"] == 1 / 40
    assert value(frame, "outlier_fraction", "magnitude |x| > 10")["value"] == 3 / 40
    top = frame[frame["metric"] == "top_feature_max_abs"]
    assert top["feature"].tolist() == [1, 0, 2]  # |x| = 15, 12, 11
    np.testing.assert_allclose(top["value"], [15.0, 12.0, 11.0])


def test_gaussian_rows_have_kurtosis_3_in_both_bases(tmp_path):
    # the sample kurtosis of n Gaussian values is 3 (n - 1) / (n + 1) on average: 2.988 at 512
    x = np.random.default_rng(2).standard_normal((2000, 512))
    frame = compute(
        [write_shard(tmp_path / "s.zarr", [x], np.arange(2000), dtype="float32")],
        0,
        [10.0],
        replace(OPTIONS, rotations=3),
    )
    assert abs(value(frame, "kurtosis")["value"] - 3) < 0.05
    assert abs(value(frame, "rotated_kurtosis")["value"] - 3) < 0.05
    assert 0 < value(frame, "rotated_kurtosis_sd")["value"] < 0.05


def test_a_huge_coordinate_is_heavy_tailed_only_in_the_standard_basis(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 64))
    x[:, 5] = 50.0 + rng.standard_normal(1000)
    frame = compute(
        [write_shard(tmp_path / "s.zarr", [x], np.arange(1000), dtype="float32")],
        0,
        [10.0],
        OPTIONS,
    )
    assert value(frame, "kurtosis")["value"] > 40
    assert abs(value(frame, "rotated_kurtosis")["value"] - 3) < 0.4
    assert value(frame, "top_feature_max_abs", "rank 1")["feature"] == 5


def test_any_split_into_shards_and_chunks_equals_one_pass_in_memory(tmp_path):
    rng = np.random.default_rng(4)
    x = heavy_tailed(rng, 600, 32, scale=20.0)
    ids = np.repeat(np.arange(120), 5)
    padding = rng.random(600) < 0.2
    in_memory = LayerStatistics(32, [random_rotation(32, 0, 0, 0)])
    in_memory.update(x[~padding].astype(np.float32), ids[~padding])
    expected = pd.DataFrame(in_memory.results([4.0], 3))
    for bounds, chunk_rows in (([0, 600], 600), ([0, 137, 301, 600], 16), ([0, 3, 598, 600], 7)):
        shards = [
            write_shard(
                tmp_path / f"{chunk_rows}-{i}.zarr",
                [x[a:b]],
                ids[a:b],
                padding[a:b],
                dtype="float32",
                chunk_rows=chunk_rows,
                chunks_per_shard=3,
            )
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
        ]
        frame = compute(shards, 0, [4.0], OPTIONS)
        assert frame["rows"].iloc[0] == (~padding).sum()
        # equal up to float32 rounding of the rotation's matrix product, which depends on blocking
        np.testing.assert_allclose(frame["value"], expected["value"], rtol=1e-6)
        np.testing.assert_allclose(frame["spread"], expected["spread"], rtol=1e-5)


def test_padding_is_excluded_unless_asked(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((100, 16))
    padding = np.arange(100) % 4 == 3
    x[padding] *= 100  # padding rows would dominate the outliers
    shard = write_shard(tmp_path / "s.zarr", [x], np.repeat(np.arange(25), 4), padding, "float32")
    without = compute([shard], 0, [10.0], OPTIONS)
    with_padding = compute([shard], 0, [10.0], replace(OPTIONS, include_padding=True))
    assert without["rows"].iloc[0] == 75 and with_padding["rows"].iloc[0] == 100
    assert value(without, "outlier_fraction", "magnitude |x| > 10")["value"] == 0
    assert value(with_padding, "outlier_fraction", "magnitude |x| > 10")["value"] == 1
    ref = scipy.stats.kurtosis(x[~padding], axis=1, fisher=False).mean()
    assert value(without, "kurtosis")["value"] == pytest.approx(ref, rel=1e-5)


def test_standard_error_is_cluster_robust_over_examples():
    rng = np.random.default_rng(6)
    counts = rng.integers(1, 8, size=50)
    ids = np.repeat(np.arange(50), counts)
    values = rng.standard_normal(len(ids)) + np.repeat(rng.standard_normal(50), counts)
    means = ClusterMeans(1)
    for part in np.array_split(np.arange(len(ids)), 7):
        means.update(values[part, None], ids[part])
    mean, error = means.finish()
    mu = values.mean()
    sums = np.bincount(ids, weights=values)
    reference = np.sqrt(((sums - counts * mu) ** 2).sum() / len(ids) ** 2 * 50 / 49)
    assert mean[0] == pytest.approx(mu) and error[0] == pytest.approx(reference)
    assert means.rows == len(ids) and means.clusters == 50


def test_rotations_are_orthogonal_seeded_and_per_layer():
    q = random_rotation(24, 0, 2, 0).astype(np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(24), atol=1e-5)
    np.testing.assert_array_equal(q, random_rotation(24, 0, 2, 0))
    assert not np.allclose(q, random_rotation(24, 0, 3, 0))
    assert not np.allclose(q, random_rotation(24, 1, 2, 0))


def test_same_inputs_and_seed_give_identical_parquet(tmp_path):
    x = heavy_tailed(np.random.default_rng(7), 300, 32)
    shard = write_shard(tmp_path / "s.zarr", [x], np.repeat(np.arange(60), 5))
    for name in ("a", "b"):
        write_parquet(
            compute([shard], 0, [10.0], replace(OPTIONS, rotations=2)), tmp_path / f"{name}.parquet"
        )
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_merge_orders_layers_in_long_form(tmp_path):
    rng = np.random.default_rng(8)
    layers = [rng.standard_normal((50, 8)) for _ in range(3)]
    shard = write_shard(tmp_path / "s.zarr", layers, np.arange(50))
    paths = []
    for k in (2, 0, 1):
        paths.append(tmp_path / f"layer-{k}.parquet")
        write_parquet(compute([shard], k, [3.0], OPTIONS), paths[-1])
    frame = merge(sorted(paths))
    assert frame["layer"].is_monotonic_increasing and set(frame["layer"]) == {0, 1, 2}
    assert {"layer", "stage", "block", "metric", "setting", "value", "spread", "rows"} <= set(frame)
    with pytest.raises(ValueError, match="expected layers 0..1"):
        merge([paths[0], paths[1]])  # layers 2 and 0


def test_shards_that_disagree_in_width_or_dtype(tmp_path):
    ids = np.arange(20)
    a = write_shard(tmp_path / "a.zarr", [np.ones((20, 8)) + np.eye(20, 8)], ids)
    b = write_shard(tmp_path / "b.zarr", [np.ones((20, 9)) + np.eye(20, 9)], ids + 20)
    c = write_shard(
        tmp_path / "c.zarr", [np.ones((20, 8)) + np.eye(20, 8)], ids + 20, dtype="float32"
    )
    with pytest.raises(StatisticsError, match="shards disagree on layer 0"):
        compute([a, b], 0, [1.0], OPTIONS)
    with pytest.raises(StatisticsError, match="float16.*float32"):
        compute([a, c], 0, [1.0], OPTIONS)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_is_refused(tmp_path, bad):
    x = np.random.default_rng(9).standard_normal((30, 8))
    x[21, 3] = bad
    shard = write_shard(tmp_path / "s.zarr", [x], np.arange(30), dtype="float32")
    with pytest.raises(
        StatisticsError, match="1 row\\(s\\) hold NaN or inf \\(first of example 21\\)"
    ):
        compute([shard], 0, [1.0], OPTIONS)


def test_a_layer_of_only_padding(tmp_path):
    x = np.random.default_rng(10).standard_normal((10, 8))
    shard = write_shard(tmp_path / "s.zarr", [x], np.arange(10), np.ones(10, bool), "float32")
    with pytest.raises(StatisticsError, match="layer 0: no rows.*include_padding"):
        compute([shard], 0, [1.0], OPTIONS)


def test_constant_rows_have_no_kurtosis(tmp_path):
    x = np.random.default_rng(11).standard_normal((10, 8))
    x[4] = 2.0
    shard = write_shard(tmp_path / "s.zarr", [x], np.arange(10), dtype="float32")
    with pytest.raises(StatisticsError, match="constant across features \\(first of example 4\\)"):
        compute([shard], 0, [1.0], OPTIONS)


def test_rows_with_zero_median_are_counted_apart(tmp_path):
    x = np.abs(np.random.default_rng(12).standard_normal((10, 8))) + 1
    x[2, :6] = 0.0  # ReLU-like: most features exactly zero
    shard = write_shard(tmp_path / "s.zarr", [x], np.arange(10), dtype="float32")
    frame = compute([shard], 0, [1.0], OPTIONS)
    assert value(frame, "max_over_median", "rows with median |x| = 0")["value"] == 1
    kept = np.delete(x, 2, axis=0)
    ratio = (kept.max(axis=1) / np.median(kept, axis=1)).mean()
    row = value(frame, "max_over_median", "row mean")
    assert row["value"] == pytest.approx(ratio, rel=1e-6) and row["rows"] == 9


@pytest.mark.parametrize("simd", [True, False], ids=["simd-selection", "radix-sort"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("width", [1, 2, 7, 768])
def test_row_median_and_max_against_numpy_float64(monkeypatch, simd, dtype, width):
    """Both ways of selecting a float16 row's middle values (and float32's one) give numpy's
    median and maximum, ties and zeros included."""
    monkeypatch.setattr(streaming_stats, "SIMD_SELECT_16", simd)
    rng = np.random.default_rng(width)
    x = np.abs(rng.standard_normal((300, width)) * rng.choice([1, 30], (300, width)))
    x[::7] = np.round(x[::7])  # ties, and zeros
    x = x.astype(dtype)
    median, largest = row_median_and_max(x)
    reference = x.astype(np.float64)
    np.testing.assert_allclose(median, np.median(reference, axis=1), rtol=1e-7)
    np.testing.assert_array_equal(largest, reference.max(axis=1))
    assert median.dtype == largest.dtype == np.float32


@pytest.mark.parametrize("width", [7, 8])
def test_the_gpu_code_path_gives_the_cpu_numbers(width):
    """LayerStatistics on a device sorts with torch and reduces with torch: run that path on the
    CPU against the numpy path, which is the reference."""
    rng = np.random.default_rng(5)
    rotations = [random_rotation(width, 0, 1, r) for r in range(2)]
    reference = LayerStatistics(width, rotations)
    device_path = LayerStatistics(width, rotations, "cpu", sort_on_device=True)
    for start in range(0, 300, 64):
        chunk = heavy_tailed(rng, 64, width, outliers=(1,)).astype(np.float16)
        chunk[::9, :] = np.abs(chunk[::9, :])  # repeated values for the k-th value
        ids = np.arange(start, start + 64) // 3
        reference.update(chunk, ids)
        device_path.update(chunk, ids)
    expected = pd.DataFrame(reference.results([1.0, 5.0], 3))
    got = pd.DataFrame(device_path.results([1.0, 5.0], 3))
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-12)


@pytest.mark.parametrize("rows", [130, 256])
def test_uncompressed_shards_read_back_through_zarr_and_corruption_is_refused(tmp_path, rows):
    from workflow_scripts.activations import ShardError, open_shard, read_rows

    rng = np.random.default_rng(2)
    layer = rng.standard_normal((rows, 12)).astype(np.float16)
    ids = np.arange(rows) // 4
    padding = rng.random(rows) < 0.3
    path = write_shard(
        tmp_path / "s.zarr", [layer], ids, padding, chunk_rows=16, chunks_per_shard=4
    )
    group = open_shard(path)
    np.testing.assert_array_equal(group["layer-0"][:], layer)
    np.testing.assert_array_equal(group["example_id"][:], ids)
    np.testing.assert_array_equal(group["is_padding"][:], padding)
    files = sorted((path / "layer-0" / "c").rglob("*"))
    assert len([f for f in files if f.is_file()]) == -(-rows // 64)  # one file per shard
    last = path / "layer-0" / "c" / "0" / "0"
    data = bytearray(last.read_bytes())
    data[40] ^= 0xFF  # inside the first chunk
    last.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="corrupted on disk"):
        read_rows(group, "layer-0", 0, 16, path)
    np.testing.assert_array_equal(read_rows(group, "layer-0", 16, 32, path), layer[16:32])


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_missing_or_empty_shard_file_is_named_not_read_as_zeros(tmp_path, compression):
    from workflow_scripts.activations import ShardError

    rng = np.random.default_rng(3)
    rows = 300
    layer = rng.standard_normal((rows, 16)).astype(np.float16)
    readouts = [Readout(0, 0, 0, "block.0", 16)]
    path = tmp_path / "s.zarr"
    writer = ShardWriter(path, readouts, rows, "float16", 32, 2, compression)
    padding = np.zeros(rows, bool)  # all False: the fill value
    writer.append([layer], np.arange(rows) // 3, np.zeros(rows, np.int32), padding)
    writer.close({"readouts": [r.as_dict() for r in readouts]})
    assert compute([path], 0, [1.0], OPTIONS)["rows"].iloc[0] == rows  # complete: it reads
    (path / "is_padding" / "c" / "1").unlink()
    with pytest.raises(ShardError, match=r"is_padding/c/1 is missing"):
        compute([path], 0, [1.0], OPTIONS)
    writer = ShardWriter(path, readouts, rows, "float16", 32, 2, compression)
    writer.append([layer], np.arange(rows) // 3, np.zeros(rows, np.int32), padding)
    writer.close({"readouts": [r.as_dict() for r in readouts]})
    (path / "layer-0" / "c" / "2" / "0").write_bytes(b"")
    with pytest.raises(ShardError, match=r"layer-0/c/2/0 is empty"):
        compute([path], 0, [1.0], OPTIONS)


def test_the_studys_example_averages_against_numpy_float64(tmp_path):
    """average: examples and rms: root_mean_square give the study's definitions: kurtosis over
    each example's rows then over examples; RMS the root of the mean over examples of each
    example's mean x^2. Examples of different lengths, so row and example means differ."""
    rng = np.random.default_rng(11)
    lengths = rng.integers(1, 40, size=60)
    ids = np.repeat(np.arange(60), lengths)
    x = heavy_tailed(rng, len(ids), 24, outliers=(2,), scale=20.0).astype(np.float16)
    x[ids % 3 == 0] *= 3  # examples of different scales
    path = write_shard(tmp_path / "s.zarr", [x], ids)
    options = replace(OPTIONS, average="examples", rms="root_mean_square")
    frame = compute([path], 0, [5.0], options)
    values = x.astype(np.float64)
    kurtosis = scipy.stats.kurtosis(values, axis=1, fisher=True, bias=True) + 3
    per_example = [kurtosis[ids == e].mean() for e in range(60)]
    mean_square = [np.mean(values[ids == e] ** 2) for e in range(60)]
    assert value(frame, "kurtosis")["value"] == pytest.approx(np.mean(per_example), rel=1e-6)
    assert value(frame, "rms")["value"] == pytest.approx(np.sqrt(np.mean(mean_square)), rel=1e-6)
    spread = np.std(per_example, ddof=1) / np.sqrt(60)
    assert value(frame, "kurtosis")["spread"] == pytest.approx(spread, rel=1e-5)
    by_rows = compute([path], 0, [5.0], OPTIONS)  # the default: over rows
    assert value(by_rows, "kurtosis")["value"] == pytest.approx(kurtosis.mean(), rel=1e-6)
    assert abs(value(by_rows, "kurtosis")["value"] - np.mean(per_example)) > 1e-3


def test_a_batch_of_a_whole_shard_in_other_dtypes_is_cast_like_any_other():
    import tempfile
    from pathlib import Path

    from workflow_scripts.activations import open_shard

    rng = np.random.default_rng(4)
    layer = rng.standard_normal((32, 8)).astype(np.float32)  # stored as float16
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.zarr"
        readouts = [Readout(0, 0, 0, "block.0", 8)]
        writer = ShardWriter(path, readouts, 32, "float16", 8, 4)  # one shard of 32 rows
        ids = np.arange(32, dtype=np.int32)  # stored as int64
        writer.append([layer], ids, np.zeros(32, np.int64), np.zeros(32, np.uint8))
        writer.close({"readouts": [r.as_dict() for r in readouts]})
        group = open_shard(path)
        np.testing.assert_array_equal(group["layer-0"][:], layer.astype(np.float16))
        np.testing.assert_array_equal(group["example_id"][:], np.arange(32))
