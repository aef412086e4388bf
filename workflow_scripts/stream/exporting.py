"""Hand-off to other tools: :func:`export` writes chosen read-out points of an activation set as
a Hugging Face dataset (Arrow files in the layout ``datasets.load_from_disk`` reads), with the
rows' example ids, token positions and token ids. ``python -m workflow_scripts.stream export``
runs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from workflow_scripts import stream
from workflow_scripts.activations import layer_name
from workflow_scripts.stream import BLOCK_BYTES, ActivationSet, StreamError

FILE_BYTES = 512 << 20  # rows of one Arrow file, about


def _tokens_of(acts: ActivationSet, model_dir: Path, data: Path):
    """Per shard, a function from a block's (example ids, positions, is_padding) to the token
    ids at those rows: the dataset's text through the model's tokenizer in the shard's own
    batches (the extraction options its attributes record), checked against the stored digests
    of the model manifest and the dataset and against the rows' padding flags."""
    from workflow_scripts.batches import text_batches
    from workflow_scripts.data.store import DatasetFile
    from workflow_scripts.models.store import MANIFEST, sha256_file, verify_files
    from workflow_scripts.tokenize import load_tokenizer

    digests, options = acts.digests, acts.options
    needed = ("batch_size", "max_tokens", "padding")
    if not {"model", "dataset"} <= set(digests) or not set(needed) <= set(options):
        raise StreamError(
            f"{acts.name}: its shards do not record the model, dataset and options they came "
            "from, so their tokens cannot be recovered: export with --no-tokens"
        )
    for path, key, what in ((model_dir / MANIFEST, "model", "model"), (data, "dataset", "data")):
        if not path.is_file():
            raise StreamError(
                f"{path}: not found; the tokens need the {what} the activations came from "
                f"(--model-dir, --data), or export with --no-tokens"
            )
        if sha256_file(path) != digests[key]:
            raise StreamError(
                f"{path}: not the {what} these activations came from (its sha256 differs from "
                f"the shards' digests.{key}); point --model-dir/--data at the right one"
            )
    manifest = json.loads((model_dir / MANIFEST).read_text())
    small = {
        name: digest
        for name, digest in manifest["files"].items()
        if not name.endswith((".safetensors", ".bin", ".pt"))
    }
    verify_files(model_dir, small)  # the tokenizer files as the manifest says
    tokenizer = load_tokenizer(model_dir, None)
    dataset = DatasetFile(data)

    def for_shard(i: int):
        span = acts._shards[i].attrs["example_range"]
        batches = text_batches(
            tokenizer,
            dataset,
            span[0],
            span[1],
            options["batch_size"],
            options["max_tokens"],
            options["padding"],
        )
        pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def lookup(ids: np.ndarray, positions: np.ndarray, padding: np.ndarray) -> np.ndarray:
            examples, inverse = np.unique(ids, return_inverse=True)
            while examples.size and (not pending or max(pending) < examples[-1]):
                batch = next(batches, None)
                if batch is None:
                    break
                tokens = batch.inputs["input_ids"].numpy()
                for row, example in enumerate(batch.example_id):
                    pending[int(example)] = (tokens[row], batch.padding[row])
            for stale in [e for e in pending if e < examples[0]] if examples.size else []:
                del pending[stale]
            held = [len(pending[e][0]) for e in examples.tolist() if e in pending]
            longest = max(held, default=0)
            table = np.zeros((len(examples), longest), np.int64)
            pads = np.ones((len(examples), longest), bool)
            for n, e in enumerate(examples.tolist()):
                if e not in pending:
                    raise StreamError(f"{acts.name}: example {e} is not in {data}'s tokens")
                tokens, padded = pending[e]
                table[n, : len(tokens)], pads[n, : len(padded)] = tokens, padded
            if positions.size and positions.max() >= longest:
                raise StreamError(f"{acts.name}: a stored token position is past its text")
            found = table[inverse, positions]
            if (pads[inverse, positions] != padding).any():
                raise StreamError(
                    f"{acts.shards[i]}: the tokens do not line up with the stored rows (padding "
                    "flags differ): was it extracted with another tokenizer or options?"
                )
            return found

        return lookup

    return for_shard


def export(
    source,
    readouts: Sequence[int],
    out: str | Path,
    *,
    include_padding: bool = False,
    tokens: bool | None = None,
    model_dir: str | Path | None = None,
    data: str | Path | None = None,
) -> Path:
    """Read-out points ``readouts`` of an activation set written as a Hugging Face dataset in
    ``out`` (``datasets.load_from_disk(out)`` reads it, memory-mapped): one row per stored row,
    columns ``example_id`` (int64), ``position`` (int32), ``token`` (the token id, int32; text
    only), ``is_padding`` (only with ``include_padding``; padding rows are dropped otherwise)
    and ``layer-{k}`` per read-out point (a fixed-size list of ``width`` values: float16 as
    stored, float32 for float32 and bfloat16). Written in Arrow files of about 512 MB, a block
    of rows at a time, so memory stays flat; ``out`` appears complete or not at all.

    ``tokens`` (default: for text): the token ids, recovered by running the model's tokenizer
    over the dataset in the batches extraction used (the shards record its options), from
    ``model_dir`` and ``data`` (default: ``results/models/{model}`` and
    ``results/data/{dataset}.parquet`` beside the activation set), both checked against the
    shards' digests, and the padding flags of every row checked against the tokens'."""
    import datasets

    from workflow_scripts.atomic import written

    acts = stream.source(source)
    readouts = [int(k) for k in readouts]
    if not readouts:
        raise StreamError("no read-out points to export (--readouts)")
    for k in readouts:
        acts.readout(k)
    text = acts.modality == "text"
    tokens = text if tokens is None else tokens
    lookup = None
    if tokens:
        if not text:
            raise StreamError(
                f"{acts.name}: its rows are not tokens ({acts.modality or 'no'} modality): "
                "export with --no-tokens"
            )
        if model_dir is None or data is None:
            if acts.model is None:
                raise StreamError("the tokens need --model-dir and --data (or --no-tokens)")
            results = Path(acts.name).resolve().parents[2]
            model_dir = model_dir or results / "models" / acts.model
            data = data or results / "data" / f"{acts.dataset}.parquet"
        lookup = _tokens_of(acts, Path(model_dir), Path(data))

    values = {k: "float16" if acts._dtypes[k] == "float16" else "float32" for k in readouts}
    fields = {"example_id": datasets.Value("int64"), "position": datasets.Value("int32")}
    if tokens:
        fields["token"] = datasets.Value("int32")
    if include_padding:
        fields["is_padding"] = datasets.Value("bool")
    for k in readouts:
        width = acts.readout(k).width
        fields[layer_name(k)] = datasets.List(datasets.Value(values[k]), length=width)
    features = datasets.Features(fields)
    row_bytes = sum(np.dtype(values[k]).itemsize * acts.readout(k).width for k in readouts)
    total = acts.rows if include_padding else acts.rows - _padding_rows(acts)
    files = _ArrowFiles(features.arrow_schema, total, max(1, FILE_BYTES // (row_bytes + 16)))

    out = Path(out)
    with written(out, directory=True) as tmp:
        files.open(tmp)
        for i, shard in enumerate(acts._shards):
            token_ids = lookup(i) if lookup is not None else None
            unit = acts._file_rows(i, layer_name(readouts[0]))
            size = max(unit, BLOCK_BYTES // row_bytes // unit * unit)
            for start in range(0, shard.rows, size):
                stop = min(start + size, shard.rows)
                ids = acts._read_shard(i, "example_id", start, stop)
                positions = acts._read_shard(i, "position", start, stop)
                padding = acts._read_shard(i, "is_padding", start, stop)
                columns = {"example_id": ids, "position": positions}
                if token_ids is not None:
                    columns["token"] = token_ids(ids, positions, padding).astype(np.int32)
                if include_padding:
                    columns["is_padding"] = padding
                for k in readouts:
                    x = acts._read_shard(i, layer_name(k), start, stop)
                    columns[layer_name(k)] = x.astype(values[k], copy=False)
                if not include_padding:
                    columns = {n: c[~padding] for n, c in columns.items()}
                files.write(columns)
        names = files.close()
        about = {
            "activations": acts.name,
            "model": acts.model,
            "dataset": acts.dataset,
            "readouts": [dataclasses.asdict(acts.readout(k)) for k in readouts],
            "storage_dtype": acts.dtype,
            "digests": acts.digests,
            "options": acts.options,
            "include_padding": include_padding,
        }
        info = datasets.DatasetInfo(
            description="Residual-stream activations exported by workflow_scripts.stream: "
            + json.dumps(about, sort_keys=True),
            features=features,
        )
        info.write_to_directory(str(tmp))
        fingerprint = hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()
        state = {  # what Dataset.save_to_disk writes beside its Arrow files
            "_data_files": [{"filename": name} for name in names],
            "_fingerprint": fingerprint[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    return out


def _padding_rows(acts: ActivationSet) -> int:
    """The padding rows of a set: one pass over ``is_padding``."""
    count = 0
    for i, shard in enumerate(acts._shards):
        for start in range(0, shard.rows, 1 << 24):
            stop = min(start + (1 << 24), shard.rows)
            count += int(acts._read_shard(i, "is_padding", start, stop).sum())
    return count


class _ArrowFiles:
    """Rows written as Arrow stream files ``data-{n:05d}-of-{files:05d}.arrow`` (the layout
    ``Dataset.save_to_disk`` writes and ``load_from_disk`` reads) of ``per_file`` rows each,
    one record batch per block written."""

    def __init__(self, schema, total: int, per_file: int):
        self.schema, self.total, self.per_file = schema, total, per_file
        self.count = max(1, -(-total // per_file))
        self.names = [f"data-{n:05d}-of-{self.count:05d}.arrow" for n in range(self.count)]
        self.folder, self.index, self.rows, self.written = None, 0, 0, 0
        self.sink = self.writer = None

    def open(self, folder: Path) -> None:
        import pyarrow as pa

        self.folder = folder
        self.sink = pa.OSFile(str(folder / self.names[0]), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)

    def _next_file(self) -> None:
        import pyarrow as pa

        self.writer.close()
        self.sink.close()
        self.index += 1
        self.rows = 0
        self.sink = pa.OSFile(str(self.folder / self.names[self.index]), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)

    def write(self, columns: dict) -> None:
        import pyarrow as pa

        n = len(columns["example_id"])
        offset = 0
        while offset < n:
            if self.rows == self.per_file:
                self._next_file()
            take = min(n - offset, self.per_file - self.rows)
            arrays = []
            for field in self.schema:
                column = columns[field.name][offset : offset + take]
                if column.ndim == 2:
                    flat = pa.array(np.ascontiguousarray(column).reshape(-1))
                    arrays.append(pa.FixedSizeListArray.from_arrays(flat, column.shape[1]))
                else:
                    arrays.append(pa.array(column, type=field.type))
            self.writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
            offset += take
            self.rows += take
            self.written += take

    def close(self) -> list[str]:
        """Finish the files (every one of them, empty if rows ran short) and name them."""
        if self.written != self.total:
            raise RuntimeError(f"wrote {self.written} rows, expected {self.total}")
        while self.index + 1 < self.count:
            self._next_file()
        self.writer.close()
        self.sink.close()
        return self.names
