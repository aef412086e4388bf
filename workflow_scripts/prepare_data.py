"""prepare_data: bring a dataset source into the stored Parquet layout.

Sources: ``builtin:<pairs|corpus|shapes>`` (generated from the seed),
``hf:<repo>[/<config>]:<split>`` (the datasets library), ``parquet:<path>`` and
``imagefolder:<path>`` (one folder per class, class names sorted). ``columns`` maps stored column
names to source column names; ``rows`` keeps a seeded random subset of that many rows, in source
order; ``image_resize`` shrinks images so their shorter side has that many pixels.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from workflow_scripts.data import builtin, store
from workflow_scripts.data.store import DatasetError
from workflow_scripts.sources import dataset_kind, source_scheme

log = logging.getLogger("prepare_data")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def prepare(spec: dict, out: str | Path, name: str = "dataset") -> pd.DataFrame:
    """Read the source ``spec`` names, check it, and write ``out``; returns the frame."""
    scheme, rest = source_scheme(spec["source"])
    kind = dataset_kind(spec)
    seed = spec.get("seed", 0)
    if scheme == "builtin":
        frame, names = builtin.generate(rest, spec.get("rows"), seed), builtin.label_names(rest)
    else:
        readers = {"hf": _from_hub, "parquet": _from_parquet, "imagefolder": _from_imagefolder}
        if scheme not in readers:
            raise DatasetError(
                f"dataset {name}: unknown source scheme {scheme!r}; allowed: "
                "builtin:, hf:, parquet:, imagefolder:"
            )
        frame, names = readers[scheme](rest, name)
        frame = _rename(frame, spec.get("columns", {}), name)
        if "example_id" not in frame:
            frame.insert(0, "example_id", np.arange(len(frame), dtype=np.int64))
        frame = _subsample(frame, spec.get("rows"), seed)
    if kind == "image" and "image_resize" in spec:
        frame["image"] = [_resize(data, spec["image_resize"]) for data in frame["image"]]
    frame = store.check(frame, kind, names, name)
    shards = spec.get("shards", 1)
    if shards > len(frame):
        raise DatasetError(
            f"dataset {name}: {shards} shards for {len(frame)} rows; shards must not exceed rows"
        )
    store.write(frame, out, kind, names)
    log.info("wrote %s: %d rows of kind %s", out, len(frame), kind)
    return frame


def _rename(frame: pd.DataFrame, columns: dict, name: str) -> pd.DataFrame:
    missing = [source for source in columns.values() if source not in frame.columns]
    if missing:
        raise DatasetError(
            f"dataset {name}: columns {missing} named in 'columns' are not in "
            f"the source (has {list(frame.columns)})"
        )
    return frame.rename(columns={source: stored for stored, source in columns.items()})


def _subsample(frame: pd.DataFrame, rows: int | None, seed: int) -> pd.DataFrame:
    if rows is None or rows >= len(frame):
        return frame
    keep = np.sort(np.random.default_rng(seed).choice(len(frame), size=rows, replace=False))
    return frame.iloc[keep].reset_index(drop=True)


def _resize(data: bytes, shorter_side: int) -> bytes:
    image = store.decode_image(data, "image_resize")
    scale = shorter_side / min(image.size)
    if scale < 1:
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
        )
    return _png(image)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _from_hub(rest: str, name: str):
    import datasets

    path, _, split = rest.partition(":")  # a repo has no ':'; a split may ('train[:100]')
    parts = path.split("/")  # <name>, <owner>/<name> or <owner>/<name>/<config>
    repo, subset = "/".join(parts[:2]), (parts[2] if len(parts) > 2 else None)
    data = datasets.load_dataset(repo, subset, split=split)
    names = None
    label = data.features.get("label")
    if label is not None and hasattr(label, "names"):
        names = list(label.names)
    image_columns = [c for c, f in data.features.items() if isinstance(f, datasets.Image)]
    frame = data.to_pandas()
    for column in image_columns:  # datasets stores images as {"bytes", "path"}
        frame[column] = [
            _png(store.decode_image(v["bytes"], f"dataset {name}")) for v in frame[column]
        ]
    if "label" in frame and (frame["label"] < 0).any():  # hub test splits mark unlabelled as -1
        frame = frame[frame["label"] >= 0].reset_index(drop=True)
    return frame, names


def _from_parquet(path: str, name: str):
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise DatasetError(f"dataset {name}: parquet file {path!r} does not exist")
    parquet = pq.read_table(path)
    metadata = parquet.schema.metadata or {}
    names = json.loads(metadata[b"label_names"]) if b"label_names" in metadata else None
    return parquet.to_pandas(), names


def _from_imagefolder(path: str, name: str):
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"dataset {name}: image folder {path!r} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"dataset {name}: image folder {path!r} has no class folders")
    rows = []
    for label, cls in enumerate(classes):
        for file in sorted((root / cls).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                image = store.decode_image(file.read_bytes(), f"dataset {name}, file {file}")
                rows.append({"image": _png(image), "label": label})
    if not rows:
        raise DatasetError(f"dataset {name}: image folder {path!r} holds no images")
    return pd.DataFrame(rows), classes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the dataset's config entry, as JSON")
    parser.add_argument("--name", required=True, help="the dataset's name, for messages")
    parser.add_argument("--out", required=True, help="the Parquet file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    prepare(json.loads(args.spec), Path(args.out), args.name)


if __name__ == "__main__":
    main()
