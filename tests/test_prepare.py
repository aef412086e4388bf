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
    frame = prepare(spec, tmp_path / "a.parquet")
    again = prepare(spec, tmp_path / "b.parquet")
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
    frame = prepare(
        {"source": f"imagefolder:{tmp_path / 'images'}", "image_resize": 10},
        tmp_path / "out.parquet",
    )
    _, kind, names = store.read(tmp_path / "out.parquet")
    assert kind == "image" and names == ["cat", "dog"]
    assert frame["label"].tolist() == [0, 0, 0, 1, 1, 1]
    image = Image.open(io.BytesIO(frame["image"][4]))
    assert image.size == (20, 10) and image.getpixel((3, 3)) == (0, 0, 255)


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
