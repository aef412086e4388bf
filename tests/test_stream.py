"""The stored stream as one dataset (workflow_scripts.stream): reads equal numpy's on the whole
array and touch only the chunks asked for; bad input is one error naming it; training batches
cover every row once, are the same whatever the DataLoader's workers, and resume exactly; the
Hugging Face export reads back with its tokens; and the docs' example runs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from support import EXTRACT_OPTIONS, REPO

from workflow_scripts import stream
from workflow_scripts.activations import ShardError, ShardWriter
from workflow_scripts.models.adapter import Readout
from workflow_scripts.stage import InputError
from workflow_scripts.stream import ActivationSet, RowDataset, StreamError, open_activations

WIDTHS = (8, 5)
CHUNK, PER_FILE = 16, 2  # 16-row chunks, 32-row shard files
BOUNDS = (0, 13, 27, 40)  # the examples of each shard


def write_set(folder: Path, dtype: str = "float16", seed: int = 0) -> dict:
    """Three shards of 40 examples of 1 to 12 rows each, the last 30% of each example's rows
    padding, two read-out points; the whole arrays, for reference."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 13, size=BOUNDS[-1])
    ids = np.repeat(np.arange(BOUNDS[-1]), lengths)
    positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    padding = positions >= np.ceil(np.repeat(lengths, lengths) * 0.7)
    layers = [(rng.standard_normal((len(ids), w)) * 4).astype(np.float32) for w in WIDTHS]
    readouts = [Readout(k, 0, k, f"block.{k}", w) for k, w in enumerate(WIDTHS)]
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(len(BOUNDS) - 1):
        rows = (ids >= BOUNDS[s]) & (ids < BOUNDS[s + 1])
        writer = ShardWriter(
            folder / f"shard-{s}.zarr", readouts, int(rows.sum()), dtype, CHUNK, PER_FILE
        )
        writer.append([x[rows] for x in layers], ids[rows], positions[rows], padding[rows])
        writer.close(
            {
                "readouts": [r.as_dict() for r in readouts],
                "modality": "text",
                "pooling": "none",
                "shard": s,
                "shards": len(BOUNDS) - 1,
                "example_range": [BOUNDS[s], BOUNDS[s + 1]],
                "options": {"dtype": dtype, "max_tokens": 12},
                "digests": {"model": "a" * 64, "dataset": "b" * 64, "code": "c" * 64},
            }
        )
    stored = [torch.from_numpy(x).to(getattr(torch, dtype)).float().numpy() for x in layers]
    return {"layers": stored, "ids": ids, "positions": positions, "padding": padding}


@pytest.fixture
def stored(tmp_path):
    folder = tmp_path / "results/activations/tiny/corpus"
    return folder, write_set(folder)


def test_a_folder_opens_as_one_set_and_reads_like_numpy(stored):
    folder, ref = stored
    acts = open_activations(folder)
    assert (acts.model, acts.dataset) == ("tiny", "corpus")
    assert acts.readouts == [Readout(k, 0, k, f"block.{k}", w) for k, w in enumerate(WIDTHS)]
    assert len(acts) == acts.rows == len(ref["ids"]) and len(acts.shards) == 3
    assert acts.digests == {"model": "a" * 64, "dataset": "b" * 64, "code": "c" * 64}
    assert acts.options["max_tokens"] == 12 and acts.dtype == "float16"
    rows = len(ref["ids"])
    for k, expected in enumerate(ref["layers"]):
        view = acts[k]
        assert view.shape == (rows, WIDTHS[k]) and view.dtype == np.float16
        keys = [
            slice(None),
            slice(5, 7),
            slice(14, 70),  # across chunks, files and a shard
            slice(rows - 3, rows + 10),
            slice(3, 200, 7),
            slice(None, None, -5),
            [rows - 1, 3, 3, 140, 0],  # any order, repeats
            np.array([[1, 2], [90, 91]]),
            ref["padding"],  # a mask
            -1,
            17,
            (slice(10, 40), [4, 0]),  # and columns
        ]
        for key in keys:
            got = view[key]
            want = expected[key]
            assert got.shape == want.shape, key
            np.testing.assert_array_equal(got.astype(np.float32), want)
        np.testing.assert_array_equal(np.asarray(view).astype(np.float32), expected)
    for name in ("example_id", "position", "is_padding"):
        key = "ids" if name == "example_id" else "positions" if name == "position" else "padding"
        np.testing.assert_array_equal(getattr(acts, name)[:], ref[key])
        np.testing.assert_array_equal(acts[name][[0, rows - 1]], ref[key][[0, rows - 1]])
    with pytest.raises(IndexError):
        acts[0][rows]
    with pytest.raises(TypeError, match="iterating row by row"):
        list(acts[0])


def test_rows_of_examples(stored):
    folder, ref = stored
    acts = open_activations(folder)
    for examples in ([5], [30, 2, 13], [0, BOUNDS[-1] - 1], 26):
        want = np.concatenate([np.flatnonzero(ref["ids"] == e) for e in np.atleast_1d(examples)])
        np.testing.assert_array_equal(acts.rows_of(examples), want)
        np.testing.assert_array_equal(
            acts[1].of_examples(examples).astype(np.float32), ref["layers"][1][want]
        )


def test_only_the_chunks_that_hold_the_rows_are_read(stored, monkeypatch):
    from workflow_scripts.activations import ArrayReader

    folder, ref = stored
    acts = open_activations(folder)
    read = []
    original = ArrayReader._read_raw

    def spy(self, start, stop, out=None):
        read.append((self.shard.name, self.name, start, stop))
        return original(self, start, stop, out)

    monkeypatch.setattr(ArrayReader, "_read_raw", spy)
    asked = [3, 100, 101, 230]
    np.testing.assert_array_equal(acts[0][asked].astype(np.float32), ref["layers"][0][asked])
    shard_of = np.searchsorted(acts.offsets, asked, side="right") - 1
    needed = {
        (f"shard-{s}.zarr", int(row - acts.offsets[s]) // CHUNK) for s, row in zip(shard_of, asked)
    }
    touched = {
        (shard, c)
        for shard, name, start, stop in read
        for c in range(start // CHUNK, -(-stop // CHUNK))
    }
    assert touched == needed and {name for _, name, _, _ in read} == {"layer-0"}
    read.clear()
    acts.rows_of([30])  # bisection over the example ids of the one shard that holds it
    assert {(s, name) for s, name, _, _ in read} == {("shard-2.zarr", "example_id")}
    assert all(stop - start <= CHUNK for _, _, start, stop in read)


def test_a_corrupted_chunk_is_refused_naming_the_shard(stored):
    folder, _ = stored
    file = folder / "shard-1.zarr" / "layer-0" / "c" / "0" / "0"
    data = bytearray(file.read_bytes())
    data[40] ^= 0xFF
    file.write_bytes(bytes(data))
    acts = open_activations(folder)
    first = int(acts.offsets[1])
    with pytest.raises(ShardError, match=r"shard-1\.zarr: layer-0 rows 0:4 are corrupted"):
        acts[0][first : first + 4]
    acts[1][first : first + 4]  # another read-out point of the shard is intact


def test_bfloat16_reads_as_float32(tmp_path):
    folder = tmp_path / "acts"
    ref = write_set(folder, dtype="bfloat16")
    acts = open_activations(folder)
    assert acts[0].dtype == np.float32
    np.testing.assert_array_equal(acts[0][10:90], ref["layers"][0][10:90])


# --- bad input ---


def test_a_folder_that_is_not_an_activation_set(stored, tmp_path):
    folder, _ = stored
    with pytest.raises(StreamError, match="no such folder"):
        open_activations(tmp_path / "nowhere")
    with pytest.raises(StreamError, match=r"not an activation set .*the activation sets corpus"):
        open_activations(folder.parent)  # one level up: it names what is inside
    (tmp_path / "empty").mkdir()
    with pytest.raises(StreamError, match=r"empty: not an activation set"):
        open_activations(tmp_path / "empty")
    (tmp_path / "fake" / "shard-0.zarr").mkdir(parents=True)
    with pytest.raises(ShardError, match=r"shard-0\.zarr: not a readable activation shard"):
        open_activations(tmp_path / "fake")
    assert issubclass(StreamError, InputError) and issubclass(ShardError, InputError)


def test_a_read_out_point_or_example_that_does_not_exist(stored):
    folder, _ = stored
    acts = open_activations(folder)
    with pytest.raises(StreamError, match=r"shard-0\.zarr: no read-out point 9; it has read"):
        acts[9]
    with pytest.raises(StreamError, match=r"no read-out point 9"):
        RowDataset(acts, [0, 9], 8)
    with pytest.raises(
        StreamError, match=r"corpus: no example 40; its shards hold examples 0\.\.39"
    ):
        acts.rows_of([3, 40])
    with pytest.raises(StreamError, match="no example -1"):
        acts[0].of_examples(-1)


def test_a_missing_or_stray_shard_is_named(stored):
    folder, _ = stored
    shutil.rmtree(folder / "shard-1.zarr")
    with pytest.raises(StreamError, match=r"shard-1\.zarr is missing; the set has 3 shard"):
        open_activations(folder)
    shutil.copytree(folder / "shard-2.zarr", folder / "shard-1.zarr")
    with pytest.raises(StreamError, match=r"shard-1\.zarr: holds shard 2 of its set, not 1"):
        open_activations(folder)


@pytest.mark.parametrize(
    "attribute, value, said",
    [
        ("digests", {"model": "d" * 64, "dataset": "b" * 64, "code": "c" * 64}, "the model"),
        ("digests", {"model": "a" * 64, "dataset": "e" * 64, "code": "c" * 64}, "the dataset"),
        ("options", {"dtype": "float16", "max_tokens": 64}, "the extraction options"),
        ("readouts", [Readout(0, 0, 0, "block.0", 8).as_dict()], "the read-out points"),
    ],
)
def test_shards_from_another_model_or_options_are_refused_by_name(stored, attribute, value, said):
    folder, _ = stored
    zarr.open_group(folder / "shard-2.zarr", mode="r+").attrs[attribute] = value
    with pytest.raises(
        StreamError, match=rf"shard-2\.zarr: not of the same activation set as .*{said}"
    ):
        open_activations(folder)


def test_shards_that_disagree_on_a_read_out_point(tmp_path):
    write_set(tmp_path / "a")
    write_set(tmp_path / "b", dtype="float32")
    shards = [tmp_path / "a/shard-0.zarr", tmp_path / "b/shard-1.zarr"]
    with pytest.raises(StreamError, match=r"shards disagree on layer 1: .*float16.*float32"):
        ActivationSet.from_shards(shards, readouts=[1])


# --- training batches ---


def loader_batches(dataset, workers: int) -> list[dict]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def rows_of(batches: list[dict]) -> list[tuple[int, int]]:
    return [
        (int(e), int(p))
        for b in batches
        for e, p in zip(b["example_id"].tolist(), b["position"].tolist())
    ]


def test_an_epoch_is_every_kept_row_once_in_a_seeded_order(stored):
    folder, ref = stored
    kept = ~ref["padding"]
    expected = sorted(zip(ref["ids"][kept].tolist(), ref["positions"][kept].tolist()))
    dataset = RowDataset(folder, [0, 1], 24, window_rows=40, seed=3)
    first = loader_batches(dataset, 0)
    assert sorted(rows_of(first)) == expected  # each kept row once, padding dropped
    assert rows_of(first) != sorted(rows_of(first))  # shuffled
    # the read-out points of a batch are of the same rows
    row = {(int(e), int(p)): i for i, (e, p) in enumerate(zip(ref["ids"], ref["positions"]))}
    for batch in first:
        at = [row[r] for r in rows_of([batch])]
        for k in range(2):
            np.testing.assert_array_equal(batch[f"layer-{k}"].numpy(), ref["layers"][k][at])
        assert batch["layer-0"].dtype == torch.float32
    assert sum(len(b["example_id"]) for b in first) == dataset.rows == kept.sum()
    assert same(first, loader_batches(RowDataset(folder, [0, 1], 24, window_rows=40, seed=3), 0))
    dataset.set_epoch(1)
    assert sorted(rows_of(loader_batches(dataset, 0))) == expected
    assert rows_of(loader_batches(dataset, 0)) != rows_of(first)  # another epoch, another order
    with_padding = RowDataset(folder, 0, 50, include_padding=True, drop_last=True)
    assert all(len(b["example_id"]) == 50 for b in loader_batches(with_padding, 0))
    assert len(with_padding) == len(ref["ids"]) // 50


def test_in_order_batches_are_the_kept_rows_in_stored_order(stored):
    folder, ref = stored
    kept = ~ref["padding"]
    for workers in (0, 2):
        batches = loader_batches(RowDataset(folder, 1, 7, shuffle=False), workers)
        assert all(len(b["layer-1"]) == 7 for b in batches[:-1])
        np.testing.assert_array_equal(
            torch.cat([b["layer-1"] for b in batches]).numpy(), ref["layers"][1][kept]
        )


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_same_batches_whatever_the_workers_and_resumed_exactly(stored, shuffle):
    folder, _ = stored
    dataset = RowDataset(folder, [0, 1], 10, shuffle=shuffle, window_rows=40, seed=7, lanes=4)
    dataset.set_epoch(2)
    runs = {workers: loader_batches(dataset, workers) for workers in (0, 1, 2, 3)}
    assert len(runs[0]) == dataset.batches_per_epoch > 8
    for workers in (1, 2, 3):
        assert same(runs[workers], runs[0]), workers
    for step in (0, 1, 5, dataset.batches_per_epoch - 1):
        for workers in (0, 2):
            dataset.set_position(2, step)
            assert len(dataset) == len(runs[0]) - step
            assert same(loader_batches(dataset, workers), runs[0][step:]), (step, workers)
    with pytest.raises(ValueError, match="step 999 is outside"):
        dataset.set_position(2, 999)


# --- hand-off to other tools ---


@pytest.fixture(scope="module")
def extracted(model_dirs, dataset_files, tmp_path_factory):
    """The default run's layout for a tiny gpt2 on the corpus: results/models/gpt2-init,
    results/data/corpus.parquet and two shards in results/activations/gpt2-init/corpus."""
    from workflow_scripts import extract as extraction
    from workflow_scripts.options.extract import ExtractOptions

    root = tmp_path_factory.mktemp("run")
    results = root / "results"
    shutil.copytree(model_dirs["gpt2"], results / "models/gpt2-init")
    (results / "data").mkdir(parents=True)
    shutil.copy(dataset_files["corpus"], results / "data/corpus.parquet")
    options = ExtractOptions(**{**EXTRACT_OPTIONS, "chunk_rows": 8, "chunks_per_shard": 2})
    folder = results / "activations/gpt2-init/corpus"
    for shard in range(2):
        extraction.extract(
            results / "models/gpt2-init",
            results / "data/corpus.parquet",
            shard,
            2,
            folder / f"shard-{shard}.zarr",
            options,
            code="test",
        )
    return root


def test_export_as_a_hugging_face_dataset_with_tokens(extracted, tmp_path):
    import datasets

    from workflow_scripts.data import store
    from workflow_scripts.stream.__main__ import main
    from workflow_scripts.tokenize import load_tokenizer

    folder = extracted / "results/activations/gpt2-init/corpus"
    out = tmp_path / "hf"
    assert main(["export", str(folder), "--readouts", "1", "2", "--out", str(out)]) == 0
    exported = datasets.load_from_disk(str(out))
    acts = open_activations(folder)
    kept = ~acts.is_padding[:]
    assert exported.num_rows == kept.sum()
    assert set(exported.column_names) == {"example_id", "position", "token", "layer-1", "layer-2"}
    table = exported.with_format("numpy")
    np.testing.assert_array_equal(table["example_id"], acts.example_id[:][kept])
    np.testing.assert_array_equal(table["position"], acts.position[:][kept])
    for k in (1, 2):
        np.testing.assert_array_equal(np.stack(table[f"layer-{k}"]), acts[k][:][kept])
    # the token at each row is the tokenizer's at that position of that example's text
    tokenizer = load_tokenizer(extracted / "results/models/gpt2-init", None)
    frame, _, _ = store.read(extracted / "results/data/corpus.parquet")
    texts = dict(zip(frame["example_id"], frame["text"]))
    max_tokens = acts.options["max_tokens"]
    for example, position, token in zip(table["example_id"], table["position"], table["token"]):
        ids = tokenizer(texts[example], truncation=True, max_length=max_tokens)["input_ids"]
        assert ids[position] == token
    # with padding rows and no tokens: every row
    assert main(["export", str(folder), "--readouts", "0", "--out", str(tmp_path / "all"),
                 "--include-padding", "--no-tokens"]) == 0  # fmt: skip
    every = datasets.load_from_disk(str(tmp_path / "all"))
    assert every.num_rows == acts.rows and "token" not in every.column_names
    np.testing.assert_array_equal(every.with_format("numpy")["is_padding"], ~kept)


def test_export_refuses_what_does_not_fit(extracted, tmp_path, capsys):
    from workflow_scripts.stream.__main__ import main

    folder = extracted / "results/activations/gpt2-init/corpus"
    assert main(["export", str(folder), "--readouts", "9", "--out", str(tmp_path / "x")]) == 1
    assert "no read-out point 9" in capsys.readouterr().err
    other = tmp_path / "other.parquet"
    other.write_bytes((extracted / "results/data/corpus.parquet").read_bytes() + b"\0")
    with pytest.raises(StreamError, match=r"other\.parquet: not the data these activations"):
        stream.export(folder, [1], tmp_path / "y", data=other)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_docs_example_trains_on_the_default_runs_activations(extracted, monkeypatch):
    """docs/stream.md's training example, run as written on a tiny extraction in the layout of
    the default run (results/activations/gpt2-init/corpus)."""
    text = (REPO / "docs/stream.md").read_text()
    example = re.search(r"<!-- example: train -->\s*```python\n(.*?)```", text, re.S)
    assert example, "docs/stream.md has no training example"
    monkeypatch.chdir(extracted)
    namespace: dict = {}
    exec(compile(example.group(1), "docs/stream.md", "exec"), namespace)
    assert namespace["losses"][-1] < namespace["losses"][0]
