"""extract: the Zarr layout, stored values equal to the adapters' streams, row bookkeeping, and
nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from support import EXTRACT_OPTIONS, REPO
from zarr.codecs import ShardingCodec

from workflow_scripts import extract as extraction
from workflow_scripts.activations import open_shard
from workflow_scripts.batches import preprocess_image
from workflow_scripts.data import builtin, store
from workflow_scripts.data.store import DatasetError
from workflow_scripts.models import load_adapter
from workflow_scripts.models.store import ModelDirError
from workflow_scripts.options.extract import ExtractOptions
from workflow_scripts.stage_code import code_key

OPTIONS = EXTRACT_OPTIONS


def run(model_dir, data, out, shard=0, shards=1, **changes):
    options = {**OPTIONS, **changes}
    code = code_key("workflow_scripts.extract")
    extraction.extract(model_dir, data, shard, shards, out, ExtractOptions(**options), code)
    return open_shard(out)


def reference_streams(adapter, frame, kind, options):
    """The adapter's streams, per example, computed one example at a time in float32."""
    out = {}
    for _, row in frame.iterrows():
        if kind == "pairs":
            enc = adapter.tokenizer(
                [row["premise"]],
                [row["hypothesis"]],
                truncation=True,
                max_length=options["max_tokens"],
                return_tensors="pt",
            )
        else:
            enc = adapter.tokenizer(
                [row["text"]],
                truncation=True,
                max_length=options["max_tokens"],
                return_tensors="pt",
            )
        with torch.no_grad():
            out[row["example_id"]] = [s[0].numpy() for s in adapter.streams(dict(enc))]
    return out


@pytest.mark.parametrize(
    "family,dataset", [("gpt2", "pairs"), ("bert", "pairs"), ("gptr2", "corpus")]
)
def test_stored_stream_equals_the_model_at_every_token(
    model_dirs, dataset_files, tmp_path, family, dataset
):
    group = run(model_dirs[family], dataset_files[dataset], tmp_path / "s.zarr", dtype="float32")
    adapter, _ = load_adapter(model_dirs[family])
    frame, kind, _ = store.read(dataset_files[dataset])
    reference = reference_streams(adapter, frame, kind, OPTIONS)
    ids, pos, pad = (group[n][:] for n in ("example_id", "position", "is_padding"))
    assert sorted(set(ids)) == sorted(reference)
    for example_id, streams in reference.items():
        rows = ids == example_id
        length = streams[0].shape[0]
        assert pos[rows][:length].tolist() == list(range(length))
        assert not pad[rows][:length].any() and pad[rows][length:].all()  # padding flagged, kept
        for k, stream in enumerate(streams):
            stored = group[f"layer-{k}"][:][rows][:length]
            np.testing.assert_allclose(stored, stream, rtol=1e-4, atol=1e-5)


def test_layout_attributes_and_codecs(model_dirs, dataset_files, tmp_path):
    group = run(model_dirs["gpt2"], dataset_files["pairs"], tmp_path / "s.zarr")
    attrs = dict(group.attrs)
    assert [r["name"] for r in attrs["readouts"]] == ["embeddings", "block.0", "block.1"]
    assert attrs["readouts"][1] == {
        "index": 1,
        "stage": 0,
        "block": 1,
        "name": "block.0",
        "width": 32,
    }
    assert attrs["pooling"] == "none" and attrs["dtype"] == "float16"
    assert attrs["examples"] == 24 and attrs["example_range"] == [0, 24]
    assert attrs["digests"]["dataset"] == extraction.sha256_file(dataset_files["pairs"])
    assert attrs["digests"]["code"] == code_key("workflow_scripts.extract")
    assert len(attrs["digests"]["model"]) == 64
    rows = attrs["rows"]
    for k in range(3):
        array = group[f"layer-{k}"]
        assert array.shape == (rows, 32) and array.dtype == np.float16
        assert array.attrs["dtype"] == "float16"  # the storage dtype, read back as it is
        assert array.chunks == (16, 32) and array.shards == (64, 32)
        assert isinstance(array.metadata.codecs[0], ShardingCodec)
        inner = [type(c).__name__ for c in array.metadata.codecs[0].codecs]
        assert inner == ["BytesCodec", "Crc32cCodec"]  # no compression by default, a checksum
    assert attrs["options"]["compression"] == "none"
    assert (
        group["example_id"].shape == group["position"].shape == group["is_padding"].shape == (rows,)
    )


def test_shards_split_the_rows_without_overlap(model_dirs, dataset_files, tmp_path):
    ids = []
    for shard in range(3):
        group = run(
            model_dirs["roberta"],
            dataset_files["pairs"],
            tmp_path / f"{shard}.zarr",
            shard=shard,
            shards=3,
        )
        ids.append(np.unique(group["example_id"][:]))
        assert group.attrs["shard"] == shard and group.attrs["shards"] == 3
    assert np.concatenate(ids).tolist() == list(range(24))


def test_max_length_padding_and_token_cap(model_dirs, dataset_files, tmp_path):
    group = run(
        model_dirs["gpt2"],
        dataset_files["corpus"],
        tmp_path / "s.zarr",
        padding="max_length",
        max_tokens=20,
    )
    assert group.attrs["rows"] == 12 * 20
    assert np.bincount(group["example_id"][:]).tolist() == [20] * 12


def test_row_subsample_is_seeded_and_shared_by_all_layers(model_dirs, dataset_files, tmp_path):
    a = run(model_dirs["gpt2"], dataset_files["pairs"], tmp_path / "a.zarr", rows_per_example=3)
    b = run(
        model_dirs["gpt2"],
        dataset_files["pairs"],
        tmp_path / "b.zarr",
        rows_per_example=3,
        batch_size=7,
        padding="max_length",
    )  # another batching: the same positions
    full = run(model_dirs["gpt2"], dataset_files["pairs"], tmp_path / "full.zarr")
    assert a.attrs["rows"] == 24 * 3
    assert not a["is_padding"][:].any()  # drawn from the real tokens only
    np.testing.assert_array_equal(a["position"][:], b["position"][:])
    # every kept row equals the same (example, position) row of the full extraction
    key = {(e, p): i for i, (e, p) in enumerate(zip(full["example_id"][:], full["position"][:]))}
    index = [key[(e, p)] for e, p in zip(a["example_id"][:], a["position"][:])]
    for k in range(3):
        np.testing.assert_array_equal(a[f"layer-{k}"][:], full[f"layer-{k}"][:][index])


def test_images_one_pooled_row_per_image(model_dirs, dataset_files, tmp_path):
    group = run(
        model_dirs["resnet"],
        dataset_files["shapes"],
        tmp_path / "s.zarr",
        dtype="float32",
        batch_size=6,
    )
    adapter, _ = load_adapter(model_dirs["resnet"])
    frame, _, _ = store.read(dataset_files["shapes"])
    pixels = torch.stack(
        [preprocess_image(store.decode_image(d, ""), adapter.preprocess) for d in frame["image"]]
    )
    assert pixels.shape == (20, 3, 32, 32) and -1 <= pixels.min() < pixels.max() <= 1
    with torch.no_grad():
        streams = adapter.streams({"pixel_values": pixels})
    assert group.attrs["pooling"] == "spatial_mean" and group.attrs["rows"] == 20
    assert [(r["stage"], r["block"]) for r in group.attrs["readouts"]] == [(1, 0), (2, 0), (2, 1)]
    np.testing.assert_array_equal(group["example_id"][:], np.arange(20))
    assert not group["is_padding"][:].any()
    for k, stream in enumerate(streams):
        np.testing.assert_allclose(group[f"layer-{k}"][:], stream.numpy(), rtol=1e-5, atol=1e-6)


def test_float16_rounding_is_the_only_difference(model_dirs, dataset_files, tmp_path):
    half = run(model_dirs["gpt2"], dataset_files["corpus"], tmp_path / "h.zarr")
    full = run(model_dirs["gpt2"], dataset_files["corpus"], tmp_path / "f.zarr", dtype="float32")
    for k in range(3):
        np.testing.assert_array_equal(
            half[f"layer-{k}"][:], full[f"layer-{k}"][:].astype(np.float16)
        )


def test_model_directory_without_weights(model_dirs, dataset_files, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(model_dirs["gpt2"], broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match="has no model.safetensors"):
        run(broken, dataset_files["pairs"], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_model_and_data_of_different_kinds(model_dirs, dataset_files, tmp_path):
    with pytest.raises(DatasetError, match="reads text.*holds image"):
        run(model_dirs["gpt2"], dataset_files["shapes"], tmp_path / "s.zarr")


def test_more_shards_than_rows(model_dirs, dataset_files, tmp_path):
    with pytest.raises(DatasetError, match="30 shards for 12 rows"):
        run(model_dirs["gpt2"], dataset_files["corpus"], tmp_path / "s.zarr", shard=0, shards=30)


def test_image_that_does_not_decode(model_dirs, tmp_path):
    frame = builtin.generate("shapes", 6, 0)
    frame.loc[4, "image"] = b"not an image"
    path = tmp_path / "bad.parquet"
    store.write(frame, path, "image", builtin.label_names("shapes"))  # bypasses prepare's check
    with pytest.raises(DatasetError, match="example 4: image does not decode"):
        run(model_dirs["resnet"], path, tmp_path / "s.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet"]


def test_failure_midway_leaves_nothing_and_keeps_an_older_shard(
    model_dirs, dataset_files, tmp_path, monkeypatch
):
    out = tmp_path / "s.zarr"
    before = run(model_dirs["gpt2"], dataset_files["pairs"], out)["layer-1"][:]
    calls = []
    real = extraction._write_batch

    def fail_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        real(*args)

    monkeypatch.setattr(extraction, "_write_batch", fail_on_third)
    with pytest.raises(RuntimeError, match="simulated"):
        run(model_dirs["gpt2"], dataset_files["pairs"], out, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    np.testing.assert_array_equal(open_shard(out)["layer-1"][:], before)


def extraction_command(model_dir, data, out, options: dict) -> list[str]:
    """The extract stage of one whole-dataset shard in a process of its own, as its job runs."""
    command = [sys.executable, "-m", "workflow_scripts.stage", "extract", f"model={model_dir}"]
    command += [f"data={data}", "shard=0", "shards=1", f"options={json.dumps(options)}"]
    return command + [f"out={out}"]


def test_killed_extraction_leaves_no_shard(model_dirs, tmp_path):
    frame = builtin.generate("corpus", 400, 0)
    data = tmp_path / "corpus.parquet"
    store.write(frame, data, "text", None)
    out = tmp_path / "shard-0.zarr"
    options = {**OPTIONS, "batch_size": 1, "chunk_rows": 8, "chunks_per_shard": 1}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        extraction_command(model_dirs["gpt2"], data, out, options),
        env=env,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    temporary = []
    while time.monotonic() < deadline and not temporary:  # wait until chunks are being written
        temporary = [p for p in tmp_path.glob(".shard-0.zarr.tmp-*/layer-0/c/*")]
        time.sleep(0.05)
    assert temporary, "extraction never started writing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".shard-0.zarr.tmp-*"))  # the killed run's partial output
    group = run(model_dirs["gpt2"], data, out, batch_size=64)  # the rerun clears it
    assert group.attrs["examples"] == 400
    assert not list(tmp_path.glob(".shard-0.zarr.tmp-*"))


def test_read_out_count_must_match_the_config(model_dirs, dataset_files, tmp_path):
    with pytest.raises(ValueError, match="has 3 read-out points, but its config entry says 13"):
        extraction.extract(
            model_dirs["gpt2"],
            dataset_files["pairs"],
            0,
            1,
            tmp_path / "s.zarr",
            ExtractOptions(**OPTIONS),
            readouts=13,
        )


def test_a_shard_reads_only_its_row_groups_and_images_decode_in_workers(
    model_dirs, tmp_path, monkeypatch
):
    monkeypatch.setitem(store.ROW_GROUP_ROWS, "image", 5)
    data = tmp_path / "shapes.parquet"
    store.write(builtin.generate("shapes", 40, 0), data, "image", builtin.label_names("shapes"))
    read = []
    original = store.DatasetFile.read_group
    monkeypatch.setattr(
        store.DatasetFile,
        "read_group",
        lambda self, group, columns=None: read.append(group) or original(self, group, columns),
    )
    out = tmp_path / "s.zarr"
    extraction.extract(
        model_dirs["resnet"],
        data,
        2,
        4,
        out,
        ExtractOptions(**{**OPTIONS, "batch_size": 4}),
        workers=0,
    )
    assert sorted(set(read)) == [4, 5]  # rows 20..29 of 40, in groups of 5
    in_workers = tmp_path / "w.zarr"
    extraction.extract(
        model_dirs["resnet"],
        data,
        2,
        4,
        in_workers,
        ExtractOptions(**{**OPTIONS, "batch_size": 4}),
        workers=2,
    )
    np.testing.assert_array_equal(open_shard(out)["example_id"][:], np.arange(20, 30))
    for name in ("layer-0", "layer-2", "example_id"):
        np.testing.assert_array_equal(open_shard(out)[name][:], open_shard(in_workers)[name][:])


def test_zstd_on_request_gives_the_same_values(model_dirs, dataset_files, tmp_path):
    plain = run(model_dirs["gpt2"], dataset_files["corpus"], tmp_path / "p.zarr")
    packed = run(
        model_dirs["gpt2"], dataset_files["corpus"], tmp_path / "z.zarr", compression="zstd"
    )
    inner = [type(c).__name__ for c in packed["layer-1"].metadata.codecs[0].codecs]
    assert inner == ["BytesCodec", "ZstdCodec", "Crc32cCodec"]
    assert packed.attrs["options"]["compression"] == "zstd"
    for name in ("layer-0", "layer-2", "example_id", "is_padding"):
        np.testing.assert_array_equal(plain[name][:], packed[name][:])


def test_a_failing_writer_stops_the_job_with_its_cause_and_leaves_nothing(
    model_dirs, dataset_files, tmp_path, monkeypatch
):
    from workflow_scripts.activations import ShardWriter

    def full_disk(self):
        if self.filled:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardWriter, "_flush", full_disk)
    forwards = []
    original = extraction._write_batch
    monkeypatch.setattr(extraction, "_write_batch", lambda *a: forwards.append(1) or original(*a))
    with pytest.raises(RuntimeError, match="No space left on device"):
        run(
            model_dirs["gpt2"],
            dataset_files["corpus"],
            tmp_path / "s.zarr",
            chunk_rows=8,
            chunks_per_shard=1,
            batch_size=2,
        )
    assert not list(tmp_path.iterdir())  # no shard, no temporary directory
    batches = -(-24 // 2)
    assert len(forwards) < batches  # stopped early, not at the end


def test_texts_that_give_no_tokens_are_named(model_dirs, tmp_path):
    data = tmp_path / "empty.parquet"
    store.write(pd.DataFrame({"example_id": [0, 1, 2], "text": ["", "", ""]}), data, "text", None)
    with pytest.raises(DatasetError, match=r"empty.parquet: examples 0 to 2 \(shard 0\) give no"):
        run(model_dirs["gpt2"], data, tmp_path / "s.zarr")
    assert not list(tmp_path.glob("*.zarr*")) and not list(tmp_path.glob(".s.zarr*"))


def test_interrupted_extraction_stops_its_writer_and_leaves_nothing(model_dirs, tmp_path):
    """SIGINT (Ctrl-C, or Snakemake stopping a job) while chunks are written: the writer thread
    stops before the cleanup, nothing is left, and the log ends with the interruption."""
    data = tmp_path / "corpus.parquet"
    store.write(builtin.generate("corpus", 2000, 0), data, "text", None)  # a run of minutes
    out = tmp_path / "shard-0.zarr"
    options = {**OPTIONS, "batch_size": 1, "chunk_rows": 8, "chunks_per_shard": 1}
    command = extraction_command(model_dirs["gpt2"], data, out, options)
    log = tmp_path / "extract.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stderr=handle,
            # Ctrl-C's default handling, even where the tests run in the background of a shell
            # (which ignores SIGINT there, and a child would inherit that)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".shard-0.zarr.tmp-*/layer-0/c/*")):
            assert process.poll() is None, f"ended before any chunk was seen:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no chunk written in 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode != 0, log.read_text()[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".shard-0.zarr.tmp-*"))
    text = log.read_text()
    assert "KeyboardInterrupt" in text and "Directory not empty" not in text
