"""extract: the residual stream of one model on one shard of a dataset, into a Zarr group.

The shard is a contiguous block of the dataset's rows, read from the row groups that hold it a
batch at a time. Text is tokenized twice (a first pass counts the rows to store), then run in
batches; every token position becomes a row, padding
included and flagged. Images give one row per image: the block output mean-pooled over space.
The group is written under a temporary name and renamed when complete. Every batch is checked
before it is stored: a row that is NaN or inf in the model's stream, or past the storage dtype's
range, stops the job (activations.StreamOverflowError) and leaves no shard; the check is computed
on the device beside the cast and read by the writer thread, so it costs the GPU no sync.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from workflow_scripts.activations import ShardWriter, StreamSource, to_storage_checked
from workflow_scripts.atomic import written
from workflow_scripts.batches import Batch, autocast, image_batches, text_batches
from workflow_scripts.data.store import DatasetError, DatasetFile
from workflow_scripts.models import load_adapter
from workflow_scripts.models.store import MANIFEST, sha256_file
from workflow_scripts.options.extract import ExtractOptions
from workflow_scripts.options.placement import Placement

log = logging.getLogger("extract")
# the options that change what is stored, recorded in the shard's attributes
CONTENT_OPTIONS = (
    "dtype",
    "max_tokens",
    "padding",
    "rows_per_example",
    "gpt2_final_readout",
    "seed",
    "batch_size",
    "autocast",
    "compression",
)


def shard_bounds(rows: int, shards: int, shard: int) -> tuple[int, int]:
    """Rows [start, stop) of shard ``shard`` of ``shards`` near-equal contiguous blocks."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is outside 0..{shards - 1}")
    if shards > rows:
        raise DatasetError(f"{shards} shards for {rows} rows; shards must not exceed rows")
    return rows * shard // shards, rows * (shard + 1) // shards


def _kept_positions(padding: np.ndarray, example_id: int, options: ExtractOptions) -> np.ndarray:
    """Token positions of one example (its row of the batch's padding mask) that become rows:
    all, padding included; or a seeded random subset of its real tokens, the same whatever the
    batch or shard it lands in."""
    keep = options.rows_per_example
    if keep is None:
        return np.arange(len(padding))
    real = np.flatnonzero(~padding)
    if keep >= len(real):
        return real
    rng = np.random.default_rng([options.seed, int(example_id)])
    return np.sort(rng.choice(real, size=keep, replace=False))


def extract(
    model_dir: str | Path,
    data_path: str | Path,
    shard: int,
    shards: int,
    out: str | Path,
    options: ExtractOptions,
    code: str = "",
    readouts: int | None = None,
    workers: int = 0,
    dtype: str | None = None,
    placement: Placement | None = None,
) -> None:
    """Write shard ``shard`` of ``shards`` of the dataset's stream through the model to ``out``,
    reading only the shard's rows. ``readouts``: the number of read-out points the config
    promises (checked); ``workers``: processes decoding images; ``dtype``: the model's
    (float32 where None); ``placement``: the model split over devices (else whole on
    ``options.device``)."""
    adapter, manifest = load_adapter(model_dir, options.gpt2_final_readout, dtype, placement)
    if readouts is not None and readouts != len(adapter.readouts):
        raise ValueError(
            f"model {model_dir} has {len(adapter.readouts)} read-out points, but "
            f"its config entry says {readouts} (check 'blocks' in the config)"
        )
    dataset = DatasetFile(data_path)
    if (adapter.modality == "image") != (dataset.kind == "image"):
        raise DatasetError(
            f"model {model_dir} reads {adapter.modality}, but {data_path} holds {dataset.kind}"
        )
    start, stop = shard_bounds(dataset.rows, shards, shard)
    device = adapter.place(options.device)
    if adapter.modality == "text":

        def batches():  # read and tokenized twice: once to count the rows, once to run
            return text_batches(
                adapter.tokenizer,
                dataset,
                start,
                stop,
                options.batch_size,
                options.max_tokens,
                options.padding,
            )

        rows = sum(
            len(_kept_positions(p, e, options))
            for b in batches()
            for p, e in zip(b.padding, b.example_id)
        )
        if rows == 0:
            raise DatasetError(
                f"{data_path}: examples {start} to {stop - 1} (shard {shard}) give no tokens "
                "to store: are their texts empty?"
            )
    else:

        def batches():
            return image_batches(
                adapter.preprocess, dataset, start, stop, options.batch_size, workers
            )

        rows = stop - start
    attributes = {
        "readouts": [r.as_dict() for r in adapter.readouts],
        "pooling": adapter.pooling,
        "dtype": options.dtype,
        "modality": adapter.modality,
        "family": manifest["family"],
        "rows": rows,
        "examples": stop - start,
        "shard": shard,
        "shards": shards,
        "example_range": [start, stop],
        "options": {k: getattr(options, k) for k in CONTENT_OPTIONS},
        "model_dtype": str(next(adapter.model.parameters()).dtype).removeprefix("torch."),
        "digests": {
            "model": sha256_file(Path(model_dir, MANIFEST)),
            "dataset": sha256_file(data_path),
            "code": code,
        },
    }
    with written(out) as tmp:
        writer = ShardWriter(
            tmp,
            adapter.readouts,
            rows,
            options.dtype,
            options.chunk_rows,
            options.chunks_per_shard,
            options.compression,
            source=_stream_source(adapter, model_dir, device, options),
        )
        total = (stop - start + options.batch_size - 1) // options.batch_size
        try:
            for batch in tqdm(
                batches(),
                total=total,
                desc=f"extract shard {shard}",
                unit="batch",
                file=sys.stderr,
                mininterval=5,
            ):
                _write_batch(adapter, batch, writer, device, options)
            writer.close(attributes)
        except BaseException:
            writer.abort()  # nothing writes into the shard while it is removed
            raise
    log.info("wrote %s: %d rows x %d read-outs", out, rows, len(adapter.readouts))


def _stream_source(adapter, model_dir, device, options: ExtractOptions) -> StreamSource:
    """Where the stream comes from, for the message of a value it cannot store."""
    dtype = next((p.dtype for p in adapter.model.parameters()), torch.float32)
    return StreamSource(
        model=Path(model_dir).name,  # results/models/{model}: the model's config name
        model_dtype=str(dtype).removeprefix("torch."),
        autocast=options.autocast if device.type == "cuda" else None,
        tokens=adapter.modality == "text",
    )


class Copies:
    """The copies to the host of one batch, from one GPU or several (a split model's blocks
    run on several): ``synchronize`` waits for all of them (the writer thread calls it)."""

    def __init__(self, events: list):
        self.events = events

    def synchronize(self) -> None:
        for event in self.events:
            event.synchronize()


def _to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Copies | None]:
    """The tensors on the host: each one on a GPU copied without blocking into pinned memory,
    with the CUDA events (one per GPU) that mark the copies done (the writer thread waits on
    them)."""
    host, gpus = [], {}
    for tensor in tensors:
        if tensor.device.type != "cuda":
            host.append(tensor.cpu())
            continue
        target = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        target.copy_(tensor, non_blocking=True)  # queued on the tensor's own GPU
        host.append(target)
        gpus[tensor.device] = None
    events = []
    for gpu in gpus:
        with torch.cuda.device(gpu):
            events.append(torch.cuda.Event())
            events[-1].record()
    return host, Copies(events) if events else None


def _stored(rows: list[torch.Tensor], dtype: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The rows of each read-out point in storage dtype ``dtype``, and whether each row is
    finite in the stream and after the cast (``[readouts, 2, rows]`` bool, for the writer to
    check): computed on each read-out's device (a split model's differ), with no sync; the
    flags gathered on the first read-out's."""
    stored, finite = zip(*(to_storage_checked(r, dtype) for r in rows))
    first = finite[0].device
    return list(stored), torch.stack([f.to(first, non_blocking=True) for f in finite])


def _write_batch(
    adapter, batch: Batch, writer: ShardWriter, device, options: ExtractOptions
) -> None:
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.inputs.items()}
    with torch.inference_mode(), autocast(device, options.autocast):
        streams = adapter.streams(inputs)
    if batch.padding is None:  # images: one row per example
        stored, finite = _stored(list(streams), options.dtype)
        host, ready = _to_host([*stored, finite])  # the flags come with the rows
        n = len(batch.example_id)
        writer.append(
            host[:-1], batch.example_id, np.zeros(n, np.int32), np.zeros(n, bool), ready, host[-1]
        )
        return
    examples, tokens = batch.padding.shape
    keep = [_kept_positions(p, e, options) for p, e in zip(batch.padding, batch.example_id)]
    rows = np.concatenate([i * tokens + k for i, k in enumerate(keep)])
    flat_rows = {}  # on each device a read-out point is on (a split model's blocks differ)
    for s in streams:
        flat_rows.setdefault(s.device, torch.from_numpy(rows).to(s.device, non_blocking=True))
    stored, finite = _stored(
        [s.reshape(examples * tokens, -1).index_select(0, flat_rows[s.device]) for s in streams],
        options.dtype,
    )
    host, ready = _to_host([*stored, finite])  # the flags come with the rows
    writer.append(
        host[:-1],
        np.repeat(batch.example_id, [len(k) for k in keep]),
        (rows % tokens).astype(np.int32),
        batch.padding.reshape(-1)[rows],
        ready,
        host[-1],
    )


def run(
    model: str,
    data: str,
    shard: int,
    shards: int,
    options: ExtractOptions,
    out: str,
    readouts: int | None = None,
    code: str = "",
    threads: int = 1,
    dtype: str | None = None,
    placement: Placement | None = None,
) -> None:
    """The extract stage: shard ``shard`` of the stream of ``model`` (run in ``dtype``, split
    over devices where ``placement`` says) on ``data``."""
    # image decoding in worker processes; the main process keeps one core
    workers = max(0, threads - 1)
    extract(model, data, shard, shards, out, options, code, readouts, workers, dtype, placement)
