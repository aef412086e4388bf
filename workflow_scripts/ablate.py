"""ablate: accuracy as residual blocks are removed from the end ("tail") or the start ("head").

For every read-out point k, whose stream comes from the first b(k) blocks:
  tail  every block from b(k) on is ablated: the stream at k goes through the model's own final
        norm and head (for a language model this is the logit lens);
  head  every block before b(k) is ablated.
Ablating a block removes its residual branch and keeps its shortcut (the identity in a
transformer; the identity or the downsample projection, then the block's ReLU, in a ResNet).
The study's variants: ``final_norm: false`` scores a tail-ablated stream without the model's
final norm (the study applied GPT-2's classifier to ``hidden_states[k]``, which is before ln_f
for every k but the last), and ``shortcut_relu: false`` passes an ablated ResNet block's
``downsample(x)`` (or x) without the ReLU.
Accuracy is top-1 and, with more than five classes, top-5: of the label for classifiers, of the
next token for causal language models. One forward pass over the dataset per distinct set of
ablated blocks.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from workflow_scripts.atomic import write_parquet
from workflow_scripts.batches import autocast, image_batches, text_batches
from workflow_scripts.data.store import DatasetError, DatasetFile
from workflow_scripts.models import load_adapter
from workflow_scripts.options.ablation import AblationOptions
from workflow_scripts.options.placement import Placement
from workflow_scripts.sources import ABLATION_HEADS

log = logging.getLogger("ablate")


WORDNET_ID = re.compile(r"n\d{8}")  # an ImageNet class folder's name


def check_compatible(adapter, dataset: DatasetFile, where: str):
    """Stop before any forward pass if the model cannot be scored on this dataset. Returns the
    model's class for each dataset label where both name their classes in different orders
    (an MNLI checkpoint may order entailment/neutral/contradiction otherwise), else None."""
    kind, label_names = dataset.kind, dataset.label_names
    needed = ABLATION_HEADS[kind]
    if adapter.head != needed:
        what = (
            "a classification head for a labelled dataset"
            if kind != "text"
            else "a causal language-model head for a text dataset (next-token accuracy)"
        )
        has = "no head (a bare base model)" if adapter.head == "none" else f"head {adapter.head!r}"
        raise DatasetError(
            f"{where}: the checkpoint has {has}, but ablation needs {what} ({needed})"
        )
    if kind != "text":
        labels = dataset.column("label")
        outside = (labels < 0) | (labels >= adapter.num_labels)
        if outside.any():
            raise DatasetError(
                f"{where}: label(s) {sorted(set(labels[outside].tolist()))[:5]} outside the "
                f"head's {adapter.num_labels} classes (examples "
                f"{dataset.column('example_id')[outside][:5].tolist()}); dataset labels: "
                f"{label_names}"
            )
    model_names = adapter.label_names
    if kind == "text" or model_names is None or label_names is None:
        return None
    ours, theirs = [n.lower() for n in label_names], [n.lower() for n in model_names]
    if ours == theirs[: len(ours)]:
        return None
    if all(WORDNET_ID.fullmatch(n) for n in ours):
        # ImageNet's folders are named by WordNet ids, and its class indices (a torchvision
        # model's outputs) are those ids in sorted order: only the whole set maps
        if len(ours) == len(theirs) and ours == sorted(ours):
            return None
        raise DatasetError(
            f"{where}: the dataset's labels are {len(ours)} WordNet ids ({label_names[0]}, ...), "
            f"but the model has {len(theirs)} classes: an ImageNet folder maps to a model's "
            "classes only whole (its sorted ids are the class indices), so give it a folder of "
            "every class"
        )
    if not set(ours) <= set(theirs):
        raise DatasetError(
            f"{where}: the model's {len(theirs)} classes ({', '.join(model_names[:5])}, ...) do "
            f"not name the dataset's labels {label_names[:10]}"
        )
    return np.array([theirs.index(n) for n in ours])


def score(
    adapter,
    batches,
    device,
    autocast_dtype: str | None,
    top5: bool,
    label_order: np.ndarray | None = None,
) -> tuple[int, int, int]:
    """(top-1 correct, top-5 correct, predictions) of the model as it stands; ``label_order``
    maps dataset labels to the model's classes."""
    correct1 = correct5 = count = 0
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        with torch.inference_mode(), autocast(device, autocast_dtype):
            logits = adapter.logits(inputs).float()
        if adapter.head == "causal_lm":  # position t predicts token t + 1
            mask = inputs["attention_mask"][:, 1:].bool() & inputs["attention_mask"][:, :-1].bool()
            logits, targets = logits[:, :-1][mask], inputs["input_ids"][:, 1:][mask]
        else:
            labels = batch.labels if label_order is None else label_order[batch.labels]
            targets = torch.tensor(labels, device=device)
        correct1 += int((logits.argmax(dim=-1) == targets).sum())
        if top5:
            correct5 += int((logits.topk(5, dim=-1).indices == targets[:, None]).any(dim=-1).sum())
        count += len(targets)
    return correct1, correct5, count


def ablate(
    model_dir: str | Path,
    data_path: str | Path,
    options: AblationOptions,
    workers: int = 0,
    dtype: str | None = None,
    placement: Placement | None = None,
) -> pd.DataFrame:
    """Long-form accuracies for every read-out point and direction, the model run in ``dtype``
    (float32 where None), split over devices where ``placement`` says (an ablated block's
    stand-in passes the stream on from the device it is on)."""
    adapter, _ = load_adapter(model_dir, dtype=dtype, placement=placement)
    dataset = DatasetFile(data_path)
    label_order = check_compatible(adapter, dataset, f"{model_dir} on {data_path}")
    device = adapter.place(options.device)

    def batches():  # every pass reads the data afresh, a batch at a time
        if dataset.kind == "image":
            return image_batches(
                adapter.preprocess, dataset, 0, dataset.rows, options.batch_size, workers
            )
        return text_batches(
            adapter.tokenizer,
            dataset,
            0,
            dataset.rows,
            options.batch_size,
            options.max_tokens,
            options.padding,
        )

    classes = adapter.num_labels if adapter.head != "causal_lm" else len(adapter.tokenizer)
    top5 = classes > 5
    n_blocks = len(adapter.block_slots)
    plans = []  # (read-out, direction, ablated blocks, through the final norm)
    for readout in adapter.readouts:
        b = adapter.blocks_applied(readout.index)
        tail = frozenset(range(b, n_blocks))
        plans += [
            (readout, "tail", tail, options.final_norm or not tail),
            (readout, "head", frozenset(range(b)), True),
        ]
    results = {}  # one pass per distinct ablation
    for ablated, final_norm in tqdm(
        dict.fromkeys(p[2:] for p in plans), desc="ablations", file=sys.stderr
    ):
        with adapter.ablated(set(ablated), final_norm, options.shortcut_relu):
            results[ablated, final_norm] = score(
                adapter, batches(), device, options.autocast, top5, label_order
            )
    records = []
    for readout, direction, ablated, final_norm in plans:
        correct1, correct5, count = results[ablated, final_norm]
        for metric, correct in (("top1", correct1), ("top5", correct5))[: 1 + top5]:
            records.append(
                {
                    "layer": readout.index,
                    "stage": readout.stage,
                    "block": readout.block,
                    "name": readout.name,
                    "direction": direction,
                    "blocks_ablated": len(ablated),
                    "metric": metric,
                    "value": correct / count,
                    "examples": dataset.rows,
                    "predictions": count,
                }
            )
    return pd.DataFrame(records)


def run(
    model: str,
    data: str,
    options: AblationOptions,
    model_name: str,
    dataset_name: str,
    out: str,
    threads: int = 1,
    dtype: str | None = None,
    placement: Placement | None = None,
) -> None:
    """The ablate stage: accuracy of ``model`` (run in ``dtype``, split over devices where
    ``placement`` says) on ``data`` under head and tail ablation."""
    frame = ablate(model, data, options, max(0, threads - 1), dtype, placement)
    frame.insert(0, "dataset", dataset_name)
    frame.insert(0, "model", model_name)
    write_parquet(frame, out)
    log.info("wrote %s: %d records", out, len(frame))
