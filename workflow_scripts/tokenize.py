"""tokenize: a text dataset through a tokenizer, as one flat memory-mapped array of token ids.

The texts in stored order, each followed by the tokenizer's end-of-text token (its separator
where it has none), as a ``.npy`` file of uint16 where the vocabulary fits, else uint32. Row
groups are tokenized in worker processes, each reading its own row group; the main process
appends their ids in order, so memory holds a few row groups' ids whatever the corpus size.
A language-model run reads its blocks of ``context`` tokens from this file (``numpy.load`` with
``mmap_mode="r"``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from workflow_scripts.atomic import written
from workflow_scripts.data.store import DatasetError, DatasetFile
from workflow_scripts.parallel import ordered_map

log = logging.getLogger("tokenize")
_worker: dict = {}  # each worker process's tokenizer and dataset


def load_tokenizer(model_dir: str | Path | None, builtin_style: str | None):
    """The tokenizer stored with a model, or a built-in one in ``builtin_style``."""
    if model_dir is not None:
        from workflow_scripts.models.hooked import load_tokenizer as from_directory

        return from_directory(model_dir)
    from workflow_scripts.models.builtin_tokenizer import builtin_tokenizer

    return builtin_tokenizer(builtin_style)


def token_dtype(vocabulary: int) -> np.dtype:
    return np.dtype(np.uint16 if vocabulary <= 2**16 else np.uint32)


def separator(tokenizer) -> int:
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if token is None:
        raise ValueError("the tokenizer has neither an end-of-text nor a separator token")
    return token


def _start_worker(data_path, model_dir, builtin_style) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the parallelism is the worker processes
    tokenizer = load_tokenizer(model_dir, builtin_style)
    _worker.update(
        tokenizer=tokenizer,
        dataset=DatasetFile(data_path),
        separator=separator(tokenizer),
        dtype=token_dtype(len(tokenizer)),
    )


def tokenize_group(group: int) -> np.ndarray:
    """The ids of one row group's texts, each followed by the separator."""
    texts = _worker["dataset"].read_group(group, ["text"]).column("text").to_pylist()
    ids = _worker["tokenizer"](texts, add_special_tokens=False)["input_ids"]
    lengths = np.fromiter((len(i) + 1 for i in ids), np.int64, len(ids))
    out = np.empty(int(lengths.sum()), _worker["dtype"])
    ends = np.cumsum(lengths)
    out[ends - 1] = _worker["separator"]
    for text_ids, start, length in zip(ids, ends - lengths, lengths):
        out[start : start + length - 1] = text_ids
    return out


def write_tokens(chunks, out: str | Path, dtype: np.dtype) -> int:
    """Append the arrays of ``chunks`` to a 1-D ``.npy`` file at ``out`` (atomically)."""
    total = 0
    with written(out) as tmp, open(tmp, "wb") as handle:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
        np.lib.format.write_array_header_1_0(handle, {**header, "shape": (0,)})
        start = handle.tell()
        for chunk in chunks:
            handle.write(np.ascontiguousarray(chunk, dtype).tobytes())
            total += len(chunk)
        handle.seek(0)  # the header's length does not depend on the count: it is padded
        np.lib.format.write_array_header_1_0(handle, {**header, "shape": (total,)})
        if handle.tell() != start:
            raise RuntimeError("the .npy header changed length")
    return total


def tokenize(data_path, out, model_dir=None, builtin_style=None, workers: int = 1) -> int:
    dataset = DatasetFile(data_path)
    if dataset.kind != "text":
        raise DatasetError(f"{data_path} holds {dataset.kind}: tokenize needs a text dataset")
    tokenizer = load_tokenizer(model_dir, builtin_style)
    dtype = token_dtype(len(tokenizer))
    del tokenizer  # the workers load their own
    groups = tqdm(
        range(dataset.groups), desc="tokenize", unit="row group", file=sys.stderr, mininterval=10
    )
    chunks = ordered_map(
        tokenize_group, groups, workers, _start_worker, (str(data_path), model_dir, builtin_style)
    )
    total = write_tokens(chunks, out, dtype)
    log.info("wrote %s: %d tokens of %d texts as %s", out, total, dataset.rows, dtype)
    return total


def run(data: str, model: str | None, builtin: str | None, out: str, threads: int = 1) -> None:
    """The tokenize stage: a text dataset as one flat token file, through the tokenizer of the
    model directory ``model`` or a family's built-in tokenizer of style ``builtin``."""
    tokenize(data, out, model, builtin, threads)
