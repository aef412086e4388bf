"""Rows read straight from uncompressed shard files are exactly Zarr's, and a corrupted chunk,
index or file is refused."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from workflow_scripts.activations import ShardError, ShardWriter, open_shard
from workflow_scripts.activations import read_rows as read_rows_with_zarr
from workflow_scripts.models.adapter import Readout
from workflow_scripts.shard_reader import raw_layout, read_rows

ROWS, WIDTH = 300, 12  # 16-row chunks, 64-row shard files: the last file holds 44 rows
RANGES = [(0, ROWS), (5, 7), (15, 17), (60, 70), (63, 129), (250, ROWS), (299, 400), (10, 10)]


def write(path, dtype="float16", compression="none"):
    rng = np.random.default_rng(0)
    layer = (rng.standard_normal((ROWS, WIDTH)) * 10).astype(dtype)
    readouts = [Readout(0, 0, 0, "block.0", WIDTH)]
    writer = ShardWriter(path, readouts, ROWS, dtype, 16, 4, compression)
    padding = rng.random(ROWS) < 0.3
    positions = np.arange(ROWS, dtype=np.int32) % 7
    writer.append([layer], np.arange(ROWS) // 5, positions, padding)
    writer.close({"readouts": [r.as_dict() for r in readouts]})
    return path


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_raw_reads_equal_zarrs_across_chunks_and_shard_files(tmp_path, dtype):
    path = write(tmp_path / "s.zarr", dtype)
    group = open_shard(path)
    for name in ("layer-0", "example_id", "position", "is_padding"):
        assert raw_layout(group[name]) == (64, 16)
        for start, stop in RANGES:
            got = read_rows(group, name, start, stop, path)
            expected = read_rows_with_zarr(group, name, start, stop, path)
            assert got.dtype == expected.dtype and got.shape == expected.shape, (name, start)
            np.testing.assert_array_equal(got, expected)


def test_zstd_shards_are_read_through_zarr(tmp_path):
    path = write(tmp_path / "s.zarr", compression="zstd")
    group = open_shard(path)
    assert raw_layout(group["layer-0"]) is None
    np.testing.assert_array_equal(
        read_rows(group, "layer-0", 63, 129, path), group["layer-0"][63:129]
    )


def test_chunks_zarr_did_not_store_read_as_the_fill_value(tmp_path):
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    array = group.create_array(
        "a",
        shape=(128, WIDTH),
        chunks=(16, WIDTH),
        shards=(64, WIDTH),
        dtype="float32",
        compressors=[Crc32cCodec()],
        fill_value=0.0,
    )
    data = np.arange(16 * WIDTH, dtype=np.float32).reshape(16, WIDTH) + 1
    array[16:32] = data  # the other chunks are never written: not stored
    group = zarr.open_group(tmp_path / "g.zarr", mode="r")
    assert raw_layout(group["a"]) == (64, 16)
    expected = np.zeros((128, WIDTH), np.float32)
    expected[16:32] = data
    np.testing.assert_array_equal(read_rows(group, "a", 0, 128, tmp_path / "g.zarr"), expected)


@pytest.mark.parametrize(
    "damage",
    ["a byte of a chunk", "a byte of the index", "the file cut short"],
)
def test_a_damaged_shard_file_is_refused_naming_it(tmp_path, damage):
    path = write(tmp_path / "s.zarr")
    group = open_shard(path)
    file = path / "layer-0" / "c" / "1" / "0"  # rows 64 to 128
    data = bytearray(file.read_bytes())
    if damage == "a byte of a chunk":
        data[40] ^= 0xFF
    elif damage == "a byte of the index":
        data[-10] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    file.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"s\.zarr: layer-0 rows 60:70 are corrupted on disk"):
        read_rows(group, "layer-0", 60, 70, path)
    np.testing.assert_array_equal(  # the other files still read
        read_rows(group, "layer-0", 0, 64, path), group["layer-0"][0:64]
    )


def test_bfloat16_is_read_raw_decoded_and_its_checksums_verified(tmp_path):
    import torch

    x = (np.random.default_rng(0).standard_normal((ROWS, WIDTH)) * 1e6).astype(np.float32)
    readouts = [Readout(0, 0, 0, "block.0", WIDTH)]
    writer = ShardWriter(tmp_path / "s.zarr", readouts, ROWS, "bfloat16", 16, 4)
    writer.append([x], np.arange(ROWS) // 5, np.zeros(ROWS, np.int32), np.zeros(ROWS, bool))
    writer.close({"readouts": [r.as_dict() for r in readouts]})
    path = tmp_path / "s.zarr"
    group = open_shard(path)
    assert raw_layout(group["layer-0"]) == (64, 16) and group["layer-0"].dtype == np.uint16
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    for start, stop in RANGES:
        got = read_rows(group, "layer-0", start, stop, path)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected[start:stop])
        np.testing.assert_array_equal(got, read_rows_with_zarr(group, "layer-0", start, stop, path))
    file = path / "layer-0" / "c" / "1" / "0"
    data = bytearray(file.read_bytes())
    data[40] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"layer-0 rows 60:70 are corrupted on disk"):
        read_rows(group, "layer-0", 60, 70, path)
