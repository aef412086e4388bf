"""top_examples: the dataset examples that activate chosen features of one read-out point most
(the study's Figure 2), with each feature's weights to the output classes where the head reads
the stream directly.

Images: a montage, one row per feature, the top examples left to right. Text: per feature, the
top (example, token) pairs, the token in brackets within its context. Weights: a ResNet's last
block feeds its classifier (fc) through average pooling, so fc's column for the feature gives
its weight to every class; a causal language model's unembedding gives the tokens the feature
pushes up most (after the final norm). Other heads are not drawn.
"""

from __future__ import annotations

import sys

import numpy as np

from workflow_scripts.data import store
from workflow_scripts.data.store import DatasetFile
from workflow_scripts.options.placement import Placement
from workflow_scripts.options.top_examples import TopExamplesOptions
from workflow_scripts.plotting import PALETTE, _pyplot, _style, save
from workflow_scripts.stage import InputError
from workflow_scripts.stream import ActivationSet


class TopExamplesError(InputError):
    """A read-out point or a feature the stored stream does not have."""


def check_features(shards: list[str], layer: int, features: list[int]) -> ActivationSet:
    """The shards, as one set, after checking that they hold read-out point ``layer`` (in
    agreement) and that it has every feature asked for."""
    acts = ActivationSet.from_shards(shards, readouts=[])
    if layer not in acts.indices:
        points = acts.indices
        raise TopExamplesError(
            f"{shards[0]}: no read-out point {layer}; the model has read-out points "
            f"{points[0]}..{points[-1]} (figures.top_examples' layer)"
        )
    width = acts.readout(layer).width
    outside = [f for f in features if not 0 <= f < width]
    if outside:
        raise TopExamplesError(
            f"feature(s) {outside} of figures.top_examples: read-out point {layer} has {width} "
            f"features, 0..{width - 1}"
        )
    return acts


def stored_blocks(shards: list[str] | ActivationSet, layer: int, include_padding: bool):
    """(x, example ids, positions) of each stored block of read-out point ``layer``, in order,
    padding rows dropped unless ``include_padding``: one Zarr shard file of rows at a time."""
    acts = (
        shards if isinstance(shards, ActivationSet) else ActivationSet.from_shards(shards, [layer])
    )
    return acts.blocks(layer, block_rows=1, include_padding=include_padding)  # 1: one file


def top_rows(
    shards: list[str], layer: int, features: list[int], count: int, include_padding: bool
) -> dict[int, list[tuple[float, int, int]]]:
    """Per feature, the ``count`` largest activations as (value, example_id, position), one pass
    over the shards with memory bounded by a chunk."""
    acts = check_features(shards, layer, features)
    best: dict[int, list] = {f: [] for f in features}
    for x, ids, positions in stored_blocks(acts, layer, include_padding):
        x = x[:, features].astype(np.float32)
        for j, feature in enumerate(features):
            top = np.argsort(-x[:, j], kind="stable")[: count * 4]  # an example may repeat
            best[feature] += [(float(x[i, j]), int(ids[i]), int(positions[i])) for i in top]
    result = {}
    for feature, candidates in best.items():
        chosen, seen = [], set()
        for value, example, position in sorted(candidates, key=lambda c: -c[0]):
            if example not in seen:  # each example once per feature: its strongest token
                chosen.append((value, example, position))
                seen.add(example)
            if len(chosen) == count:
                break
        result[feature] = chosen
    return result


def output_weights(adapter, layer: int):
    """("class" or "token", the matrix [outputs, features] through which the head reads this
    read-out point directly), or None where it does not: the adapter's answer (a ResNet's
    classifier after its last block, a causal language model's unembedding)."""
    return adapter.output_weights(layer)


def class_weights(adapter, layer: int, feature: int, names: list[str] | None):
    """(labels, weights) of a feature to the outputs, or None where the head does not read it
    directly."""
    import torch

    found = output_weights(adapter, layer)
    if found is None:
        return None
    rows, matrix = found
    weights = matrix[:, feature].float()  # a bfloat16 model's too (numpy has no bfloat16)
    if rows == "class":
        labels = names or [str(i) for i in range(len(weights))]
        return labels, weights.numpy()
    top = torch.topk(weights, 8).indices.tolist()
    return adapter.tokenizer.convert_ids_to_tokens(top), weights[top].numpy()


def draw(
    adapter, frame, kind: str, label_names, layer: int, chosen: dict, max_tokens: int, title: str
):
    plt = _pyplot()
    _style(plt)
    features = list(chosen)
    count = max(len(v) for v in chosen.values())
    by_id = frame.set_index("example_id")
    image = kind == "image"
    columns = count + 1 if image else 2
    figure, axes = plt.subplots(
        len(features),
        columns,
        squeeze=False,
        layout="constrained",
        figsize=(1.3 * columns + 2.5 if image else 12, 1.6 * len(features) + 0.6),
        gridspec_kw={"width_ratios": [1] * count + [2.5] if image else [3, 1]},
    )
    for row, feature in enumerate(features):
        if image:
            for col in range(count):
                axis = axes[row, col]
                axis.axis("off")
                if col < len(chosen[feature]):
                    value, example, _ = chosen[feature][col]
                    axis.imshow(
                        store.decode_image(by_id.loc[example, "image"], f"example {example}")
                    )
                    label = by_id.loc[example, "label"]
                    axis.set_title(
                        f"{value:.2f}\n{label_names[label] if label_names else label}", fontsize=7
                    )
            axes[row, 0].text(
                -0.1,
                0.5,
                f"feature {feature}",
                transform=axes[row, 0].transAxes,
                ha="right",
                va="center",
                fontsize=8,
            )
        else:
            axis = axes[row, 0]
            axis.axis("off")
            lines = [
                f"{value:6.2f}  "
                + _in_context(adapter, by_id.loc[example], kind, position, max_tokens)
                for value, example, position in chosen[feature]
            ]
            axis.text(
                0,
                1,
                f"feature {feature}\n" + "\n".join(lines),
                va="top",
                family="monospace",
                fontsize=7,
                transform=axis.transAxes,
            )
        weights_axis = axes[row, -1]
        weights = class_weights(adapter, layer, feature, label_names)
        if weights is None:
            weights_axis.axis("off")
            weights_axis.text(
                0.5,
                0.5,
                "the head does not read\nthis point directly",
                ha="center",
                va="center",
                fontsize=7,
            )
        else:
            labels, values = weights
            weights_axis.barh(
                range(len(values)),
                values,
                color=[PALETTE[0] if v >= 0 else PALETTE[1] for v in values],
            )
            weights_axis.set_yticks(range(len(values)), labels, fontsize=6)
            weights_axis.invert_yaxis()
            weights_axis.set_title("weight to output", fontsize=7)
    figure.suptitle(title, fontsize=9)
    return figure


def example_tokens(adapter, row, kind: str, max_tokens: int) -> list[str]:
    """The tokens of an example as the model read it (positions index them)."""
    if kind == "pairs":
        ids = adapter.tokenizer(
            row["premise"], row["hypothesis"], truncation=True, max_length=max_tokens
        )["input_ids"]
    else:
        ids = adapter.tokenizer(row["text"], truncation=True, max_length=max_tokens)["input_ids"]
    return adapter.tokenizer.convert_ids_to_tokens(ids)


def context(tokens: list[str], position: int, window: int = 8):
    """(tokens before, the token, tokens after) ``position``, ``window`` each side; None for a
    position past the tokens (padding)."""
    if position >= len(tokens):
        return None
    return (
        tokens[max(0, position - window) : position],
        tokens[position],
        tokens[position + 1 : position + 1 + window],
    )


def _in_context(adapter, row, kind: str, position: int, max_tokens: int, window: int = 8) -> str:
    """The example's tokens around ``position``, the token itself in brackets."""
    around = context(example_tokens(adapter, row, kind, max_tokens), position, window)
    if around is None:
        return "(padding)"
    left, token, right = around
    return f"{' '.join(left)} [{token}] {' '.join(right)}".strip()


def run(
    model: str,
    data: str,
    shards: list[str],
    stats: str,
    options: TopExamplesOptions,
    title: str,
    png: str,
    pdf: str,
    dtype: str | None = None,
    placement: Placement | None = None,
) -> None:
    """The figure_top_examples stage: the rows where each chosen feature of a layer is largest,
    shown as tokens in context or image thumbnails. The features: ``options.features``, else
    the layer's top features by max |x| from its statistics ``stats``. ``dtype``: what the
    model (its tokenizer or preprocessing is what is used) is loaded in."""
    import pandas as pd

    from workflow_scripts.models import load_adapter
    from workflow_scripts.models.placement import weights_in_files

    layer = options.layer
    features = options.features
    if not features:  # the layer's top features by max |x|, from the statistics
        frame = pd.read_parquet(stats)
        top = frame[frame["metric"] == "top_feature_max_abs"].sort_values("value", ascending=False)
        features = [int(f) for f in top["feature"].head(options.top)]
    if not features:
        raise ValueError(f"{stats}: no top features listed (stats.top_features is 0)")
    # the tokenizer and the unembedding only: a split model's weights stay in their files
    adapter, _ = load_adapter(model, dtype=dtype, placement=weights_in_files(placement))
    dataset = DatasetFile(data)
    chosen = top_rows(shards, layer, features, options.examples, options.include_padding)
    ids = {example for rows in chosen.values() for _, example, _ in rows}
    frame, kind, label_names = dataset.find(ids), dataset.kind, dataset.label_names
    figure = draw(adapter, frame, kind, label_names, layer, chosen, options.max_tokens, title)
    save(figure, [png, pdf], options.dpi)
    print(f"wrote {png}, {pdf}", file=sys.stderr)
