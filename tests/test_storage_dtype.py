"""Storage dtypes of the stream: bfloat16 stored as its bit patterns and read back exactly as
torch rounds it (and as an independent float64 reference does); a value the storage dtype
cannot hold (NaN or inf from the model, or past float16's range) stops extraction with a message
that names the read-out point, the row and the setting to change, and leaves nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support import EXTRACT_OPTIONS

from workflow_scripts import extract as extraction
from workflow_scripts.activations import (
    ShardWriter,
    StreamOverflowError,
    decode,
    encode,
    open_shard,
    to_storage,
    to_storage_checked,
)
from workflow_scripts.activations import read_rows as read_rows_with_zarr
from workflow_scripts.layer_stats import compute
from workflow_scripts.models.adapter import Readout
from workflow_scripts.options.extract import ExtractOptions
from workflow_scripts.shard_reader import raw_layout, read_rows
from workflow_scripts.stage import InputError

ROWS, WIDTH = 300, 12  # 16-row chunks, 64-row shard files: the last file holds 44 rows


def bfloat16_reference(x: np.ndarray) -> np.ndarray:
    """The bfloat16 value nearest each finite float of ``x``, ties to the even significand,
    computed in float64 from the format's definition (1 sign, 8 exponent, 7 significand bits):
    no bit trick and no torch. Past the largest value plus half an ulp: inf."""
    e = np.arange(1, 255)[:, None]  # normal exponents
    m = np.arange(128)[None, :]
    normal = (2.0 ** (e - 127) * (1 + m / 128)).ravel()
    values = np.concatenate([np.arange(128) * 2.0**-133, normal])  # subnormals (and 0), normals
    significand = np.concatenate([np.arange(128), np.tile(np.arange(128), 254)])
    magnitude = np.abs(x.astype(np.float64))
    upper = np.searchsorted(values, magnitude).clip(1, len(values) - 1)
    low, high = values[upper - 1], values[upper]
    below, above = magnitude - low, high - magnitude
    pick_high = (above < below) | ((above == below) & (significand[upper] % 2 == 0))
    nearest = np.where(pick_high, high, low)
    largest, ulp = values[-1], values[-1] - values[-2]  # past it: inf from half an ulp on
    beyond = np.where(magnitude >= largest + ulp / 2, np.inf, largest)
    nearest = np.where(magnitude > largest, beyond, nearest)
    return np.copysign(nearest, x).astype(np.float32)


def hard_values(rng) -> np.ndarray:
    """[ROWS, WIDTH] float32: heavy-tailed values over many magnitudes, with exact ties
    between two bfloat16 values, subnormals, signed zeros, and values past float16's range."""
    x = rng.standard_t(2, (ROWS, WIDTH)).astype(np.float32) * np.float32(10.0) ** rng.integers(
        -30, 30, (ROWS, WIDTH)
    ).astype(np.float32)
    ties = (rng.integers(0, 2**16, 64, dtype=np.uint32) << 16) | 0x8000  # halfway bit patterns
    ties &= ~np.uint32(0x7F800000) | np.uint32(0x3F800000)  # keep them finite
    x.reshape(-1)[:64] = ties.view(np.float32)
    x[1, :6] = [0.0, -0.0, 1e-40, -3e-39, 1e5, -7.0e5]
    x[2, :3] = [65504.0, 65520.0, 3.3e38]
    return x


def write(path, layer, dtype, compression="none", stream=None):
    readouts = [Readout(0, 0, 0, "block.0", WIDTH)]
    writer = ShardWriter(path, readouts, len(layer), dtype, 16, 4, compression)
    positions = np.arange(len(layer), dtype=np.int32) % 7
    writer.append(
        [layer if stream is None else stream],
        np.arange(len(layer)) // 5,
        positions,
        np.zeros(len(layer), bool),
    )
    writer.close({"readouts": [r.as_dict() for r in readouts]})
    return path


def test_the_float64_reference_is_torchs_rounding():
    """The two references agree, so either can judge the store (and neither is the store)."""
    x = hard_values(np.random.default_rng(1))
    np.testing.assert_array_equal(
        bfloat16_reference(x), torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    )


@pytest.mark.parametrize("given", ["float32 rows", "bfloat16 tensor", "to_storage bits"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_bfloat16_round_trip_through_the_writer_and_both_readers(tmp_path, given, compression):
    x = hard_values(np.random.default_rng(0))
    stream = {
        "float32 rows": x,
        "bfloat16 tensor": torch.from_numpy(x).to(torch.bfloat16),
        "to_storage bits": to_storage(torch.from_numpy(x), "bfloat16"),
    }[given]
    path = write(tmp_path / "s.zarr", x, "bfloat16", compression, stream)
    group = open_shard(path)
    array = group["layer-0"]
    assert array.dtype == np.uint16 and array.attrs["dtype"] == "bfloat16"
    assert group.attrs["dtype"] == "bfloat16"
    assert (raw_layout(array) is not None) == (compression == "none")
    expected = torch.tensor(x).to(torch.bfloat16).float().numpy()
    reference = bfloat16_reference(x)
    for start, stop in [(0, ROWS), (5, 7), (63, 129), (250, ROWS)]:
        for reader in (read_rows, read_rows_with_zarr):
            got = reader(group, "layer-0", start, stop, path)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, expected[start:stop])
            np.testing.assert_array_equal(got, reference[start:stop])
            # signed zeros and every bit, not only equal values
            np.testing.assert_array_equal(got.view(np.uint32), expected[start:stop].view(np.uint32))
    # the index arrays are untouched
    np.testing.assert_array_equal(
        read_rows(group, "example_id", 0, ROWS, path), np.arange(ROWS) // 5
    )
    assert np.abs(expected[1, 4:6]).min() > 65504  # past float16's range, held


def test_bfloat16_decoding_is_exact_for_every_finite_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    finite = (bits & 0x7F80) != 0x7F80
    got = decode(bits[finite], "bfloat16")
    sign = np.where(bits[finite] >> 15, -1.0, 1.0)
    exponent = (bits[finite] >> 7) & 0xFF
    significand = (bits[finite] & 0x7F).astype(np.float64)
    value = np.where(
        exponent == 0,
        significand * 2.0**-133,
        (1 + significand / 128) * 2.0 ** (exponent.astype(np.float64) - 127),
    )
    np.testing.assert_array_equal(got, (sign * value).astype(np.float32))
    np.testing.assert_array_equal(np.signbit(got), bits[finite] >> 15 == 1)


def test_encode_on_the_host_is_to_storage_on_the_device():
    x = hard_values(np.random.default_rng(2))
    for dtype in ("float16", "bfloat16", "float32"):
        on_host = encode(x, dtype)
        on_device = to_storage(torch.from_numpy(x), dtype).numpy()
        np.testing.assert_array_equal(on_host.view(np.uint8), on_device.view(np.uint8))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_float16_and_float32_shards_read_as_before(tmp_path, dtype, compression):
    """Their arrays hold the values as stored, read in their own dtype; a shard written before
    arrays had a ``dtype`` attribute reads the same."""
    x = np.random.default_rng(0).standard_normal((ROWS, WIDTH)).astype(dtype) * 10
    path = write(tmp_path / "s.zarr", x, dtype, compression)
    group = open_shard(path)
    assert group["layer-0"].dtype == np.dtype(dtype) and group["layer-0"].attrs["dtype"] == dtype
    for reader in (read_rows, read_rows_with_zarr):
        got = reader(group, "layer-0", 0, ROWS, path)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, x)
    metadata = path / "layer-0" / "zarr.json"
    old = json.loads(metadata.read_text())
    del old["attributes"]["dtype"]
    metadata.write_text(json.dumps(old))
    group = open_shard(path)
    for reader in (read_rows, read_rows_with_zarr):
        got = reader(group, "layer-0", 0, ROWS, path)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, x)


def test_the_flags_say_finite_in_the_stream_and_after_the_cast():
    x = torch.tensor([[1.0, 2.0], [1e5, 0.0], [float("nan"), 1.0], [65519.0, 0], [65520.0, 0]])
    stored, finite = to_storage_checked(x, "float16")
    assert stored.dtype == torch.float16
    assert finite.tolist() == [[True, True, False, True, True], [True, False, False, True, False]]
    _, finite = to_storage_checked(x, "bfloat16")
    assert finite.tolist() == [[True, True, False, True, True], [True, True, False, True, True]]
    big = torch.tensor([[3.3e38], [3.4e38]])  # the second rounds past bfloat16's largest
    assert to_storage_checked(big, "bfloat16")[1].tolist() == [[True, True], [True, False]]
    half = torch.tensor([[1.0], [float("inf")]], dtype=torch.float16)
    assert to_storage_checked(half, "float32")[1].tolist() == [[True, False], [True, False]]
    # the flags against the cast itself, on values about every dtype's edge, with NaN and inf
    rng = np.random.default_rng(3)
    edges = [65504.0, 65519.996, 65520.0, 3.389531e38, 3.3961776e38, 3.4028235e38]
    bits = np.array([0x7F7F7FFF, 0x7F7F8000, 0x477FEFFF, 0x477FF000], np.uint32)
    special = np.concatenate([edges, bits.view(np.float32), [np.inf, np.nan, 1e5, 3.0]])
    values = rng.choice(special, (4000, 3)) * rng.choice([1, -1], (4000, 3))
    values = np.where(rng.random((4000, 3)) < 0.7, rng.standard_normal((4000, 3)), values)
    for source in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.from_numpy(values.astype(np.float32)).to(source)
        for dtype in ("float16", "bfloat16", "float32"):
            stored, finite = to_storage_checked(x, dtype)
            cast = stored.view(torch.bfloat16) if dtype == "bfloat16" else stored
            assert finite[0].tolist() == torch.isfinite(x).all(dim=1).tolist()
            assert finite[1].tolist() == torch.isfinite(cast).all(dim=1).tolist(), (source, dtype)


def test_the_writer_refuses_a_batch_it_cannot_store(tmp_path):
    """Given host rows without flags, the writer computes them; the error is the InputError
    itself, raised at the next append or at close, and names the first read-out and row."""
    readouts = [Readout(0, 0, 0, "embeddings", 4), Readout(1, 0, 1, "block.0", 4)]
    writer = ShardWriter(tmp_path / "s.zarr", readouts, 20, "float16", 4, 2)
    ok = np.ones((10, 4), np.float32)
    index = (np.arange(10) // 2, np.arange(10, dtype=np.int32) % 2, np.zeros(10, bool))
    writer.append([ok, ok], *index)
    bad = ok.copy()
    bad[7, 2] = 1e5
    writer.append([ok, bad], *index)
    with pytest.raises(StreamOverflowError) as caught:
        writer.close({})
    message = str(caught.value)
    assert isinstance(caught.value, InputError)
    assert "read-out 1 (block.0), example 3, token position 1:" in message
    assert "float16's range (±65504)" in message and "extract.dtype: bfloat16" in message
    writer.abort()


def run(model_dirs, dataset_files, out, **changes):
    options = ExtractOptions(**{**EXTRACT_OPTIONS, **changes})
    extraction.extract(model_dirs["gpt2"], dataset_files["pairs"], 0, 1, out, options)
    return open_shard(out)


def with_streams(monkeypatch, change, model_dtype=torch.float32):
    """Extraction's adapter (in ``model_dtype``) with ``change(call, streams)`` applied to each
    batch's streams; returns the list of batches run."""
    calls = []
    load = extraction.load_adapter

    def patched(*args, **kwargs):
        adapter, manifest = load(*args, **kwargs)
        adapter.model.to(model_dtype)
        streams = adapter.streams

        def changed(inputs):
            calls.append(1)
            out = [s.clone() for s in streams(inputs)]
            change(len(calls), out)
            return out

        adapter.streams = changed
        return adapter, manifest

    monkeypatch.setattr(extraction, "load_adapter", patched)
    return calls


def test_a_value_past_float16s_range_stops_extraction_and_leaves_nothing(
    model_dirs, dataset_files, tmp_path, monkeypatch
):
    def huge(call, streams):
        if call == 2:  # the second batch: examples 5 to 9
            streams[2][1, 3, 7] = 1e5  # example 6, token 3

    calls = with_streams(monkeypatch, huge)
    with pytest.raises(StreamOverflowError) as caught:
        run(model_dirs, dataset_files, tmp_path / "s.zarr", batch_size=5)
    message = str(caught.value)
    assert "read-out 2 (block.1), example 6, token position 3:" in message
    assert "float16's range (±65504)" in message
    assert "extract.dtype: bfloat16" in message and "extract.dtype: float32" in message
    assert "models.gpt2.dtype" not in message
    assert not list(tmp_path.iterdir())  # no shard, no temporary directory
    assert len(calls) < 5  # stopped within the writer's queue, not at the end


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16"])
def test_nan_from_the_model_names_the_models_dtype(
    model_dirs, dataset_files, tmp_path, monkeypatch, dtype, model_dtype
):
    def nan(call, streams):
        if call == 1:
            streams[1][4, 0, 5] = float("nan")  # example 4, token 0

    with_streams(monkeypatch, nan, getattr(torch, model_dtype))
    with pytest.raises(StreamOverflowError) as caught:
        run(model_dirs, dataset_files, tmp_path / "s.zarr", batch_size=5, dtype=dtype)
    message = str(caught.value)
    assert "read-out 1 (block.0), example 4, token position 0" in message
    assert "the model's own forward gave NaN or inf" in message
    assert "models.gpt2.dtype" in message and "extract.dtype" not in message
    if model_dtype == "bfloat16":
        assert "run the model in a wider dtype: set models.gpt2.dtype: float32" in message
    else:
        assert "runs in float32 already (models.gpt2.dtype)" in message
    assert not list(tmp_path.iterdir())


def test_images_name_the_example_without_a_position(
    model_dirs, dataset_files, tmp_path, monkeypatch
):
    def huge(call, streams):
        if call == 1:
            streams[0][2, 1] = -2e5

    with_streams(monkeypatch, huge)
    options = ExtractOptions(**{**EXTRACT_OPTIONS, "batch_size": 6})
    with pytest.raises(
        StreamOverflowError, match=r"read-out 0 \(\w+\.0\), example 2: a finite value"
    ):
        extraction.extract(
            model_dirs["resnet"], dataset_files["shapes"], 0, 1, tmp_path / "s.zarr", options
        )
    assert not list(tmp_path.iterdir())


def scaled_embeddings(monkeypatch, factor=5e6):
    """The tiny GPT-2 with its token embeddings scaled so that its stream holds values of
    about 1e5 (finite in float32, past float16's range): its own forward, no value put in."""
    load = extraction.load_adapter

    def patched(*args, **kwargs):
        adapter, manifest = load(*args, **kwargs)
        with torch.no_grad():
            adapter.model.get_input_embeddings().weight.mul_(factor)
        return adapter, manifest

    monkeypatch.setattr(extraction, "load_adapter", patched)


def test_a_huge_stream_is_refused_as_float16_and_stored_as_bfloat16(
    model_dirs, dataset_files, tmp_path, monkeypatch
):
    scaled_embeddings(monkeypatch)
    with pytest.raises(StreamOverflowError, match=r"read-out 0 \(embeddings\), example 0, token"):
        run(model_dirs, dataset_files, tmp_path / "h.zarr")
    assert not list(tmp_path.iterdir())
    full = run(model_dirs, dataset_files, tmp_path / "f.zarr", dtype="float32")
    brain = run(model_dirs, dataset_files, tmp_path / "b.zarr", dtype="bfloat16")
    assert brain.attrs["dtype"] == "bfloat16" and brain["layer-0"].dtype == np.uint16
    path = tmp_path / "b.zarr"
    for k in range(3):
        exact = full[f"layer-{k}"][:]
        assert np.isfinite(exact).all() and np.abs(exact).max() > 65504
        got = read_rows(brain, f"layer-{k}", 0, brain.attrs["rows"], path)
        np.testing.assert_array_equal(got, torch.from_numpy(exact).bfloat16().float().numpy())
        np.testing.assert_array_equal(got, bfloat16_reference(exact))
        # within bfloat16's rounding: half an ulp, 2**-9 of the value
        np.testing.assert_array_less(np.abs(got - exact), np.abs(exact) * 2.0**-8 + 1e-38)


def test_layer_stats_reads_bfloat16_shards_as_float_values(model_dirs, dataset_files, tmp_path):
    from support import stats_options

    run(model_dirs, dataset_files, tmp_path / "f.zarr", dtype="float32")
    run(model_dirs, dataset_files, tmp_path / "b.zarr", dtype="bfloat16")
    options = stats_options()
    exact = compute([tmp_path / "f.zarr"], 1, [1.0], options).set_index(["metric", "setting"])
    brain = compute([tmp_path / "b.zarr"], 1, [1.0], options).set_index(["metric", "setting"])
    assert (brain["rows"] == exact["rows"]).all()
    kurtosis = ("kurtosis", exact.loc["kurtosis"].index[0])
    assert brain.loc[kurtosis, "value"] == pytest.approx(exact.loc[kurtosis, "value"], rel=1e-2)
    with pytest.raises(Exception, match="shards disagree on layer 1.*float32.*bfloat16"):
        compute([tmp_path / "f.zarr", tmp_path / "b.zarr"], 1, [1.0], options)


def test_top_examples_and_feature_pages_read_bfloat16_as_float_values(tmp_path):
    """The stages that rank rows see a bfloat16 shard as the float32 shard of the same values."""
    from workflow_scripts.feature_page import top_k
    from workflow_scripts.top_examples import top_rows

    x = hard_values(np.random.default_rng(4))
    x[np.abs(x) > 1e30] = 1.0  # keep the ranking about ordinary values
    rounded = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    brain = str(write(tmp_path / "b.zarr", x, "bfloat16"))
    full = str(write(tmp_path / "f.zarr", rounded, "float32"))
    assert top_rows([brain], 0, [0, 3, 11], 4, True) == top_rows([full], 0, [0, 3, 11], 4, True)
    ours, theirs = top_k([brain], 0, 5, True), top_k([full], 0, 5, True)
    for field in ("values", "examples", "positions", "max_abs"):
        np.testing.assert_array_equal(getattr(ours, field), getattr(theirs, field))


def test_the_stage_ends_with_one_line_naming_the_setting(model_dirs, dataset_files, tmp_path):
    """The extract stage, as a job runs it, on a model directory whose token embeddings are
    scaled past float16's range: the job ends with one line (no traceback) and no shard."""
    import os
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file
    from support import REPO

    from workflow_scripts.models.store import MANIFEST, sha256_file

    model = tmp_path / "huge"
    shutil.copytree(model_dirs["gpt2"], model)
    weights = load_file(model / "model.safetensors")
    (key,) = [k for k in weights if k.endswith("wte.weight")]
    weights[key] = weights[key] * 5e6
    save_file(weights, model / "model.safetensors")
    manifest = json.loads((model / MANIFEST).read_text())
    manifest["files"]["model.safetensors"] = sha256_file(model / "model.safetensors")
    (model / MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "out" / "shard-0.zarr"
    command = [sys.executable, "-m", "workflow_scripts.stage", "extract", f"model={model}"]
    command += [f"data={dataset_files['corpus']}", "shard=0", "shards=1", f"out={out}"]
    command += [f"options={json.dumps(EXTRACT_OPTIONS)}"]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "ERROR" in last and "read-out 0 (embeddings), example 0, token position 0:" in last
    assert "set extract.dtype: bfloat16" in last
    assert not list((tmp_path / "out").iterdir())


def test_top_examples_weigh_a_bfloat16_models_features_as_float_values(model_dirs):
    """A model run in its own bfloat16 (the census's dtype: auto) has its unembedding in
    bfloat16, which numpy cannot hold: the weights of a feature to the tokens come out as
    float32, the bfloat16 model's own values."""
    from workflow_scripts.models import load_adapter
    from workflow_scripts.top_examples import class_weights

    adapter, _ = load_adapter(model_dirs["gpt2"], dtype="bfloat16")
    last = len(adapter.readouts) - 1
    _, matrix = adapter.output_weights(last)
    assert matrix.dtype == torch.bfloat16
    tokens, weights = class_weights(adapter, last, 5, None)
    assert weights.dtype == np.float32 and len(tokens) == 8
    expected = torch.topk(matrix[:, 5].float(), 8).values.numpy()
    np.testing.assert_array_equal(weights, expected)
