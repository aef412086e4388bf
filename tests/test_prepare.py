"""prepare_data: every source into the stored Parquet layout, and bad input refused."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from workflow_scripts.data import builtin, store
from workflow_scripts.data.store import DatasetError
from workflow_scripts.prepare_data import prepare


def test_builtin_pairs_layout_and_label_names(tmp_path):
    out = tmp_path / "pairs.parquet"
    prepare({"source": "builtin:pairs", "rows": 30, "seed": 0}, out)
    parquet = pq.read_table(out)
    assert parquet.column_names == ["example_id", "premise", "hypothesis", "label"]
    assert json.loads(parquet.schema.metadata[b"label_names"]) == builtin.PAIR_LABELS
    frame, kind, names = store.read(out)
    assert kind == "pairs" and names == builtin.PAIR_LABELS and len(frame) == 30
    pd.testing.assert_frame_equal(frame, builtin.generate("pairs", 30, 0))


def test_parquet_source_with_column_mapping_and_row_cap(tmp_path):
    source = tmp_path / "source.parquet"
    texts = [f"the dog runs {i} ." for i in range(50)]
    pd.DataFrame({"sentence": texts, "other": range(50)}).to_parquet(source)
    spec = {
        "source": f"parquet:{source}",
        "kind": "text",
        "columns": {"text": "sentence"},
        "rows": 10,
        "seed": 3,
    }
    prepare(spec, tmp_path / "a.parquet")
    prepare(spec, tmp_path / "b.parquet")
    frame, again = store.read(tmp_path / "a.parquet")[0], store.read(tmp_path / "b.parquet")[0]
    assert list(frame.columns) == ["example_id", "text"] and len(frame) == 10
    pd.testing.assert_frame_equal(frame, again)
    ids = frame["example_id"].to_numpy()
    assert (np.diff(ids) > 0).all()  # source order kept
    assert frame["text"].tolist() == [texts[i] for i in ids]  # ids are source positions


def test_parquet_source_missing_columns(tmp_path):
    source = tmp_path / "source.parquet"
    pd.DataFrame({"premise": ["a"], "label": [0]}).to_parquet(source)
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['hypothesis'\]"):
        prepare({"source": f"parquet:{source}", "kind": "pairs"}, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_column_mapping_to_a_column_that_does_not_exist(tmp_path):
    source = tmp_path / "source.parquet"
    pd.DataFrame({"text": ["a"]}).to_parquet(source)
    with pytest.raises(DatasetError, match=r"\['sentence'\] named in 'columns'"):
        prepare(
            {"source": f"parquet:{source}", "kind": "text", "columns": {"text": "sentence"}},
            tmp_path / "out.parquet",
        )


def test_labels_outside_the_label_names(tmp_path):
    source = tmp_path / "source.parquet"
    frame = pd.DataFrame({"premise": ["a", "b"], "hypothesis": ["c", "d"], "label": [0, 5]})
    import pyarrow as pa

    parquet = pa.Table.from_pandas(frame).replace_schema_metadata(
        {b"label_names": json.dumps(["yes", "no"]).encode()}
    )
    pq.write_table(parquet, source)
    with pytest.raises(DatasetError, match=r"outside 0..1 .*example\(s\) \[1\]"):
        prepare({"source": f"parquet:{source}", "kind": "pairs"}, tmp_path / "out.parquet")


def _png(colour, size=(8, 8)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_imagefolder(tmp_path):
    for cls, colour in (("cat", "red"), ("dog", "blue")):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "images" / cls / f"{i}.png").write_bytes(_png(colour, (40, 20)))
    prepare(
        {"source": f"imagefolder:{tmp_path / 'images'}", "image_resize": 10},
        tmp_path / "out.parquet",
    )
    frame, kind, names = store.read(tmp_path / "out.parquet")
    assert kind == "image" and names == ["cat", "dog"]
    frame = frame.sort_values("example_id")  # stored in a seeded random order
    assert frame["example_id"].tolist() == list(range(6))  # positions in the sorted listing
    assert frame["label"].tolist() == [0, 0, 0, 1, 1, 1]
    image = Image.open(io.BytesIO(frame["image"].iloc[4]))
    assert image.size == (20, 10) and image.getpixel((3, 3)) == (0, 0, 255)


def test_images_in_sub_folders_are_of_their_class_folders_class(tmp_path):
    """As torchvision's ImageFolder reads them: nothing below a class folder is dropped."""
    for relative, colour in (
        ("cat/0.png", "red"),
        ("cat/more/1.png", "red"),
        ("cat/more/deeper/2.png", "red"),
        ("dog/0.png", "blue"),
        ("dog/x/1.png", "blue"),
        ("dog/.hidden/3.png", "green"),  # hidden folders are skipped, as hidden class folders
    ):
        (tmp_path / "images" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / relative).write_bytes(_png(colour))
    prepare({"source": f"imagefolder:{tmp_path / 'images'}"}, tmp_path / "out.parquet")
    frame, _, names = store.read(tmp_path / "out.parquet")
    assert names == ["cat", "dog"] and len(frame) == 5
    colours = {
        label: {Image.open(io.BytesIO(b)).getpixel((1, 1)) for b in part["image"]}
        for label, part in frame.groupby("label")
    }
    assert colours == {0: {(255, 0, 0)}, 1: {(0, 0, 255)}}


def test_image_that_does_not_decode(tmp_path):
    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "good.png").write_bytes(_png("red"))
    (tmp_path / "images" / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match="bad.png: image does not decode"):
        prepare({"source": f"imagefolder:{tmp_path / 'images'}"}, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_parquet_image_that_does_not_decode(tmp_path):
    source = tmp_path / "source.parquet"
    pd.DataFrame({"image": [_png("red"), b"garbage"], "label": [0, 1]}).to_parquet(source)
    with pytest.raises(DatasetError, match="example 1: image does not decode"):
        prepare({"source": f"parquet:{source}", "kind": "image"}, tmp_path / "out.parquet")


def test_more_shards_than_rows(tmp_path):
    with pytest.raises(DatasetError, match="5 shards for 4 rows"):
        prepare({"source": "builtin:corpus", "rows": 4, "shards": 5}, tmp_path / "out.parquet")


def test_reading_a_file_that_is_not_a_prepared_dataset(tmp_path):
    pd.DataFrame({"text": ["a"]}).to_parquet(tmp_path / "raw.parquet")
    with pytest.raises(DatasetError, match="no 'kind'"):
        store.read(tmp_path / "raw.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        store.read(tmp_path / "junk.parquet")


def _jpeg(colour, size=(64, 48)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_imagefolder_keeps_the_files_bytes_in_a_seeded_order_with_workers(tmp_path):
    files = {}
    for cls, colour in (("a", "red"), ("b", "green"), ("c", "blue")):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(40):
            data = _jpeg(colour, (64 + i, 48))
            (tmp_path / "images" / cls / f"{i:03d}.jpg").write_bytes(data)
            files[(cls, i)] = data
    spec = {"source": f"imagefolder:{tmp_path / 'images'}", "rows": 100, "seed": 4}
    prepare(spec, tmp_path / "one.parquet", workers=1)
    prepare(spec, tmp_path / "two.parquet", workers=2)
    one, two = store.read(tmp_path / "one.parquet")[0], store.read(tmp_path / "two.parquet")[0]
    pd.testing.assert_frame_equal(one, two)  # the worker count changes nothing
    assert len(one) == 100 and one["example_id"].is_unique
    assert not one["example_id"].is_monotonic_increasing  # classes mixed, not sorted
    for example_id, label, data in zip(one["example_id"], one["label"], one["image"]):
        cls = "abc"[label]
        assert data == files[(cls, example_id - 40 * label)]  # the file's bytes, JPEG as is
    groups = pq.ParquetFile(tmp_path / "one.parquet")
    assert (
        groups.schema_arrow.metadata[b"row_group_rows"]
        == str(store.ROW_GROUP_ROWS["image"]).encode()
    )


def test_rows_are_written_in_row_groups_and_read_by_range(tmp_path, monkeypatch):
    monkeypatch.setitem(store.ROW_GROUP_ROWS, "text", 7)
    prepare({"source": "builtin:corpus", "rows": 50}, tmp_path / "out.parquet")
    parquet = pq.ParquetFile(tmp_path / "out.parquet")
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    assert sizes == [7] * 7 + [1]
    dataset = store.DatasetFile(tmp_path / "out.parquet")
    whole = builtin.generate("corpus", 50, 0)
    pd.testing.assert_frame_equal(dataset.read(12, 31), whole.iloc[12:31].reset_index(drop=True))
    parts = list(dataset.batches(5, 40, 4))
    assert [len(p) for p in parts] == [4] * 8 + [3]
    pd.testing.assert_frame_equal(
        pd.concat(parts, ignore_index=True), whole.iloc[5:40].reset_index(drop=True)
    )
    positions = np.array([44, 3, 17, 3, 30])
    pd.testing.assert_frame_equal(
        dataset.take(positions), whole.iloc[positions].reset_index(drop=True)
    )


def test_builtin_sets_are_the_same_rows_in_blocks(monkeypatch):
    whole = builtin.generate("shapes", 25, 2)
    monkeypatch.setattr(builtin, "BLOCK_ROWS", 10)
    assert len(list(builtin.blocks("shapes", 25, 2))) == 3
    assert builtin.generate("shapes", 25, 2)["example_id"].tolist() == list(range(25))
    assert not whole.equals(builtin.generate("shapes", 25, 2))  # blocks have their own seeds
    assert builtin.generate("shapes", 25, 2).equals(builtin.generate("shapes", 25, 2))


def test_parquet_rows_subsampled_across_batches(tmp_path, monkeypatch):
    import workflow_scripts.prepare_data as prepare_data

    monkeypatch.setattr(prepare_data, "BLOCK_ROWS", 16)
    source = tmp_path / "source.parquet"
    texts = [f"text {i}" for i in range(200)]
    pd.DataFrame({"text": texts}).to_parquet(source, row_group_size=30)
    prepare(
        {"source": f"parquet:{source}", "kind": "text", "rows": 37, "seed": 1},
        tmp_path / "o.parquet",
    )
    frame = store.read(tmp_path / "o.parquet")[0]
    expected = np.sort(np.random.default_rng(1).choice(200, size=37, replace=False))
    assert frame["example_id"].tolist() == expected.tolist()
    assert frame["text"].tolist() == [texts[i] for i in expected]


def test_hub_dataset_read_in_batches_keeps_image_bytes_and_drops_unlabelled(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    images = [_jpeg("red"), _png("blue"), _jpeg("green"), _png("white"), _jpeg("black")]
    data = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], "label": [0, -1, 1, 1, 0]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])}
        ),
    )
    calls = []

    def load_dataset(repo, subset, split):
        calls.append((repo, subset, split))
        return data

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    prepare(
        {"source": "hf:owner/set/config:test", "kind": "image"}, tmp_path / "out.parquet", workers=2
    )
    frame, kind, names = store.read(tmp_path / "out.parquet")
    assert calls == [("owner/set", "config", "test")] and names == ["x", "y"]
    assert frame["example_id"].tolist() == [0, 1, 2, 3]  # positions after the unlabelled row
    assert frame["image"].tolist() == [images[0], images[2], images[3], images[4]]
    assert frame["label"].tolist() == [0, 1, 1, 0]


def test_a_bad_image_among_many_is_named_with_workers(tmp_path):
    images = [_jpeg("red") for _ in range(150)]
    images[131] = images[131][:200]  # truncated
    source = tmp_path / "source.parquet"
    pd.DataFrame({"image": images, "label": [0] * 150}).to_parquet(source)
    with pytest.raises(DatasetError, match="example 131: image does not decode"):
        prepare(
            {"source": f"parquet:{source}", "kind": "image"}, tmp_path / "out.parquet", workers=2
        )
    assert not list(tmp_path.glob("*out.parquet*"))


def test_an_empty_parquet_file_is_named(tmp_path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty.parquet is not a readable Parquet file"):
        prepare(
            {"source": f"parquet:{tmp_path / 'empty.parquet'}", "kind": "text"},
            tmp_path / "o.parquet",
        )
    with pytest.raises(DatasetError, match=r"empty.parquet: not a readable Parquet file"):
        store.DatasetFile(tmp_path / "empty.parquet")


def test_hub_labels_under_another_column_name(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict(
        {"first": ["a", "b", "c", "d"], "second": list("efgh"), "labels": [0, 1, -1, 2]},
        features=datasets.Features(
            {
                "first": datasets.Value("string"),
                "second": datasets.Value("string"),
                "labels": datasets.ClassLabel(names=["x", "y", "z"]),
            }
        ),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, subset, split: data)
    spec = {
        "source": "hf:owner/set:test",
        "kind": "pairs",
        "columns": {"premise": "first", "hypothesis": "second", "label": "labels"},
    }
    prepare(spec, tmp_path / "out.parquet")
    frame, _, names = store.read(tmp_path / "out.parquet")
    assert names == ["x", "y", "z"]  # the mapped column's class names
    assert frame["label"].tolist() == [0, 1, 2]  # its unlabelled row dropped
    assert store.DatasetFile(tmp_path / "out.parquet").take([]).empty


def test_a_parquet_source_that_is_a_folder_is_named(tmp_path):
    (tmp_path / "folder.parquet").mkdir()
    with pytest.raises(DatasetError, match="folder.parquet' is a folder, not a file"):
        prepare(
            {"source": f"parquet:{tmp_path / 'folder.parquet'}", "kind": "text"},
            tmp_path / "out.parquet",
        )


def test_a_corrupted_dataset_names_its_file_not_a_codec(tmp_path):
    """A flipped byte in a stored dataset's data pages: one line naming the file and the row
    group, not the codec's own error."""
    import pyarrow.parquet as pq

    out = tmp_path / "corpus.parquet"
    prepare({"source": "builtin:corpus", "rows": 200}, out)
    column = pq.ParquetFile(out).metadata.row_group(0).column(1)  # the text, compressed
    assert column.compression != "UNCOMPRESSED"
    data = bytearray(out.read_bytes())
    start = column.dictionary_page_offset or column.data_page_offset
    middle = start + column.total_compressed_size // 2
    for i in range(middle, middle + 64):
        data[i] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(
        DatasetError, match=r"corpus.parquet: row group 0 does not read .*corrupted"
    ):
        store.DatasetFile(out).read_group(0)
