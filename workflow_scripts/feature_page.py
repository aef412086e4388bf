"""feature_page: a self-contained HTML page of one read-out point on which a reader picks any
feature and sees the dataset examples that activate it most, with their activations, and the
feature's weights to the outputs where the head reads the point directly (the study's Figure 2,
for every feature).

The top examples of all features come from one streaming pass over the stored shards: a running
``[k, features]`` buffer of values, example ids and token positions, merged with each block of
rows (``argpartition`` on the concatenation), so memory is bounded by a block whatever the number
of rows. Each example counts once per feature, at its strongest token: the rows of an example are
contiguous in the shards, so a block is first reduced to one candidate per (example, feature),
and an example cut by a block boundary is held back and joined to the next block. The same pass
gives each feature's largest |x|, which ranks the outlying features the page lists.

The page holds its data as JSON and runs plain JavaScript: no server, no network. Images are
JPEG thumbnails (at most ``thumbnail`` pixels a side) in data URIs, each example once; text is the
token in its context. ``page.html#feature=<id>`` opens a feature, and choosing one updates the
address.
"""

from __future__ import annotations

import base64
import io
import json
import math
import sys
from dataclasses import dataclass

import numpy as np

from workflow_scripts.atomic import written
from workflow_scripts.data import store
from workflow_scripts.data.store import DatasetFile
from workflow_scripts.options.feature_page import FeaturePageOptions
from workflow_scripts.options.placement import Placement
from workflow_scripts.stream import ActivationSet
from workflow_scripts.top_examples import context, example_tokens, output_weights, stored_blocks

JPEG_QUALITY = 75
ALL_CLASSES = 16  # a classifier with at most this many classes shows them all
CONTEXT = 8  # tokens either side of a text example's token


@dataclass
class TopK:
    """Per feature, its ``k`` largest activations (each example once), largest first."""

    values: np.ndarray  # [k, features] float32
    examples: np.ndarray  # [k, features] int64
    positions: np.ndarray  # [k, features] int32
    max_abs: np.ndarray  # [features] the largest |x| of each feature over every row read
    rows: int  # rows read


class StreamingTopK:
    """The running top-k of every feature; ``update`` takes rows of whole examples."""

    def __init__(self, width: int, k: int):
        self.k = k
        self.values = np.empty((0, width), np.float32)
        self.examples = np.empty((0, width), np.int64)
        self.positions = np.empty((0, width), np.int32)
        self.max_abs = np.full(width, -np.inf, np.float32)
        self.rows = 0

    def update(self, x: np.ndarray, ids: np.ndarray, positions: np.ndarray) -> None:
        if not len(x):
            return
        x = np.asarray(x, np.float32)
        self.rows += len(x)
        self.max_abs = np.fmax(self.max_abs, np.fmax.reduce(np.abs(x), axis=0))
        if np.isnan(x).any():  # a NaN never ranks
            x = np.where(np.isnan(x), -np.inf, x)
        values, examples, rows = per_example_max(x, ids)
        self._merge(
            values,
            np.broadcast_to(examples[:, None], values.shape),
            positions[rows],
        )

    def _merge(self, values, examples, positions) -> None:
        values = np.concatenate([self.values, values])
        examples = np.concatenate([self.examples, examples])
        positions = np.concatenate([self.positions, positions])
        if len(values) > self.k:
            keep = np.argpartition(-values, self.k - 1, axis=0)[: self.k]
            values = np.take_along_axis(values, keep, 0)
            examples = np.take_along_axis(examples, keep, 0)
            positions = np.take_along_axis(positions, keep, 0)
        self.values, self.examples, self.positions = values, examples, positions

    def result(self) -> TopK:
        order = np.argsort(-self.values, axis=0, kind="stable")
        return TopK(
            np.take_along_axis(self.values, order, 0),
            np.take_along_axis(self.examples, order, 0),
            np.take_along_axis(self.positions, order, 0),
            self.max_abs,
            self.rows,
        )


def per_example_max(x: np.ndarray, ids: np.ndarray):
    """Rows of contiguous examples reduced to one per example: (the max of each feature
    [examples, features], the example ids [examples], the row each max is at, first of ties
    [examples, features])."""
    n = len(ids)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    if len(starts) == n:  # one row per example (images)
        return x, ids, np.broadcast_to(np.arange(n)[:, None], x.shape)
    values = np.maximum.reduceat(x, starts, axis=0)
    lengths = np.diff(np.r_[starts, n])
    at_max = x == np.repeat(values, lengths, axis=0)
    index = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)[:, None]
    rows = np.minimum.reduceat(np.where(at_max, index, n), starts, axis=0)
    return values, ids[starts], rows


def _whole_examples(blocks):
    """The same rows in pieces that never split an example: the rows of the last example of a
    block wait for the next block."""
    held = None
    for x, ids, positions in blocks:
        if held is not None:
            x, ids, positions = (np.concatenate([h, b]) for h, b in zip(held, (x, ids, positions)))
        if not len(ids):
            held = None
            continue
        others = np.flatnonzero(ids != ids[-1])
        cut = int(others[-1]) + 1 if len(others) else 0
        if cut:
            yield x[:cut], ids[:cut], positions[:cut]
        held = (x[cut:], ids[cut:], positions[cut:])
    if held is not None and len(held[1]):
        yield held


def top_k(shards: list[str], layer: int, k: int, include_padding: bool) -> TopK:
    """The top ``k`` examples of every feature of read-out point ``layer``: one pass over the
    shards, one block in memory."""
    acts = ActivationSet.from_shards(shards, readouts=[layer])
    stream = StreamingTopK(acts.readout(layer).width, k)
    for x, ids, positions in _whole_examples(stored_blocks(acts, layer, include_padding)):
        stream.update(x, ids, positions)
    return stream.result()


# --- what the page shows of the examples, and the weights ---


def thumbnail(data: bytes, where: str, size: int) -> str:
    """A JPEG data URI of the image, at most ``size`` pixels a side (never enlarged)."""
    image = store.decode_image(data, where)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def describe_examples(
    dataset: DatasetFile, adapter, best: TopK, options: FeaturePageOptions
) -> dict:
    """What the page shows of each chosen example: {"<example>": {"label", "image"}} for images,
    {"<example>:<position>": {"label", "left", "token", "right"}} for text. The dataset is read
    one row group at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(np.unique(best.examples))
    positions: dict[int, set[int]] = {}
    for example, position in zip(best.examples.ravel(), best.positions.ravel()):
        positions.setdefault(int(example), set()).add(int(position))
    names = dataset.label_names
    shown = {}
    for group in range(dataset.groups):
        table = dataset.read_group(group)
        table = table.filter(pc.is_in(table["example_id"], wanted))
        for row in table.to_pylist():
            example = int(row["example_id"])
            label = row.get("label")
            if label is not None:
                label = names[label] if names and 0 <= label < len(names) else str(label)
            if dataset.kind == "image":
                shown[str(example)] = {
                    "label": label,
                    "image": thumbnail(row["image"], f"example {example}", options.thumbnail),
                }
                continue
            tokens = example_tokens(adapter, row, dataset.kind, options.max_tokens)
            for position in sorted(positions[example]):
                around = context(tokens, position, CONTEXT)
                left, token, right = around if around is not None else ([], "(padding)", [])
                shown[f"{example}:{position}"] = {
                    "label": label,
                    "left": left,
                    "token": token,
                    "right": right,
                }
    return shown


def feature_weights(adapter, layer: int, names: list[str] | None, count: int):
    """Each feature's weights to the outputs, where the head reads the point directly: every
    class of a classifier with at most ALL_CLASSES, else the ``count`` outputs (classes, or
    tokens through the unembedding) it raises most. {"rows", "labels", "features": per feature
    [[label index, weight], ...]}, or None."""
    import torch

    found = output_weights(adapter, layer)
    if found is None:
        return None
    rows, matrix = found
    matrix = matrix.float()
    if rows == "class" and matrix.shape[0] <= ALL_CLASSES:
        index = torch.arange(matrix.shape[0])[:, None].expand_as(matrix)
        values = matrix
        selection = "every class"
    else:
        values, index = torch.topk(matrix, min(count, matrix.shape[0]), dim=0)
        selection = f"the {values.shape[0]} {rows}s it raises most"
    used = sorted(set(index.flatten().tolist()))
    if rows == "class":
        labels = [names[i] if names else str(i) for i in used]
    else:
        labels = adapter.tokenizer.convert_ids_to_tokens(used)
    where = {output: i for i, output in enumerate(used)}
    features = [
        [[where[o], _number(w, 4)] for o, w in zip(column_index, column_values)]
        for column_index, column_values in zip(index.T.tolist(), values.T.tolist())
    ]
    return {"rows": rows, "selection": selection, "labels": labels, "features": features}


def _number(value: float, digits: int | None = None):
    """A JSON-safe number: rounded to ``digits`` significant digits if given; inf and NaN as
    text."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return float(f"{value:.{digits}g}") if digits else value


def page_data(
    best: TopK, shown: dict, weights, options: FeaturePageOptions, title: str, kind: str
) -> dict:
    width = best.values.shape[1]
    ranked = np.argsort(-best.max_abs, kind="stable")[: options.outlying]
    return {
        "title": title,
        "kind": kind,
        "layer": options.layer,
        "features": width,
        "k": options.examples,
        "rows": best.rows,
        "include_padding": options.include_padding,
        "named": [f for f in options.features or [] if f < width],
        "outlying": [[int(f), _number(best.max_abs[f], 4)] for f in ranked],
        "top": [
            [
                [_number(v), int(e), int(p)]
                for v, e, p in zip(best.values[:, f], best.examples[:, f], best.positions[:, f])
            ]
            for f in range(width)
        ],
        "examples": shown,
        "weights": weights,
    }


def render(data: dict) -> str:
    """The page: the template with the data as JSON (safe inside a script element)."""
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        payload = payload.replace(char, escape)
    head, tail = TEMPLATE.split("{{ data }}")
    return head.replace("{{ title }}", _html_escape(data["title"])) + payload + tail


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def build(
    model: str,
    data: str,
    shards: list[str],
    options: FeaturePageOptions,
    title: str,
    out: str,
    dtype: str | None = None,
    placement: Placement | None = None,
) -> dict:
    """Write the page of ``options.layer`` to ``out`` (the model loaded in ``dtype``); returns
    its data."""
    from workflow_scripts.models import load_adapter
    from workflow_scripts.models.placement import weights_in_files

    # the tokenizer and the unembedding only: a split model's weights stay in their files
    adapter, _ = load_adapter(model, dtype=dtype, placement=weights_in_files(placement))
    dataset = DatasetFile(data)
    best = top_k(shards, options.layer, options.examples, options.include_padding)
    shown = describe_examples(dataset, adapter, best, options)
    weights = feature_weights(adapter, options.layer, dataset.label_names, options.output_weights)
    content = page_data(best, shown, weights, options, title, dataset.kind)
    with written(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(render(content))
    return content


def run(
    model: str,
    data: str,
    shards: list[str],
    options: FeaturePageOptions,
    title: str,
    out: str,
    dtype: str | None = None,
    placement: Placement | None = None,
) -> None:
    """The feature_page stage: one offline page of every feature's top examples."""
    content = build(model, data, shards, options, title, out, dtype, placement)
    print(
        f"wrote {out}: {content['features']} features, top {content['k']} of "
        f"{content['rows']} rows, {len(content['examples'])} examples shown",
        file=sys.stderr,
    )


# The page. {{ title }} and {{ data }} are filled in by render(); plain JavaScript, no network.
TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.25em; margin: 0.2em 0; }
h2 { font-size: 1.1em; margin: 0.8em 0 0.3em; }
h3 { font-size: 1em; margin: 0.4em 0; }
#summary { color: #555; margin: 0.2em 0 0.6em; }
.controls { display: flex; gap: 0.5em; align-items: center; flex-wrap: wrap; }
.controls input { width: 7em; font-size: 1em; }
.jump { margin: 0.4em 0; }
.jump button { margin: 2px; font: 12px monospace; cursor: pointer; }
.jump button.current { background: #0072B2; color: #fff; }
main { display: flex; gap: 3em; flex-wrap: wrap; align-items: flex-start; }
#examples.image { display: flex; flex-wrap: wrap; gap: 10px; max-width: 60em; }
#examples.image figure { margin: 0; text-align: center; font-size: 12px; }
#examples.image img { width: 96px; height: auto; display: block; border: 1px solid #ccc; }
#examples.text .example { font-family: monospace; margin: 0.25em 0; white-space: pre-wrap; }
.value { display: inline-block; min-width: 6em; font-family: monospace; font-weight: bold; }
.label { color: #666; margin-left: 0.6em; }
mark { background: #E69F00; color: #000; padding: 0 2px; border-radius: 2px; }
#weights table { border-collapse: collapse; font-size: 13px; }
#weights td { padding: 1px 6px; }
#weights td.name { font-family: monospace; text-align: right; }
.bar { height: 0.9em; display: inline-block; vertical-align: middle; }
.note { color: #666; font-style: italic; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p id="summary"></p>
<div class="controls">
  <button id="prev" type="button">&larr; previous</button>
  <label>feature <input id="feature-input" type="number" min="0" step="1"></label>
  <button id="next" type="button">next &rarr;</button>
  <span id="feature-count"></span>
</div>
<div class="jump" id="outlying"></div>
<div class="jump" id="named"></div>
<h2 id="shown-feature"></h2>
<main>
  <section><h3>top examples</h3><div id="examples"></div></section>
  <section><h3 id="weights-title">weights to the outputs</h3><div id="weights"></div></section>
</main>
<script type="application/json" id="page-data">{{ data }}</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("page-data").textContent);
const input = document.getElementById("feature-input");
let current = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}
function format(value) { return typeof value === "number" ? value.toFixed(3) : String(value); }
function clamp(feature) { return Math.min(Math.max(feature, 0), DATA.features - 1); }
function fromHash() {
  const match = /(?:^#|&)feature=(\\d+)/.exec(location.hash);
  return match ? Number(match[1]) : null;
}

function choose(feature) {
  if (!Number.isInteger(feature)) { input.value = current; return; }
  feature = clamp(feature);
  show(feature);
  try {
    if (fromHash() !== feature) location.hash = "feature=" + feature;
  } catch (error) { /* an address that cannot change (a sandboxed frame): the page still works */ }
}

function jumpList(id, caption, entries) {
  const box = document.getElementById(id);
  if (!entries.length) return;
  box.append(caption + " ");
  for (const [feature, text] of entries) {
    const button = el("button", {type: "button", "data-feature": feature}, text);
    button.addEventListener("click", () => choose(feature));
    box.append(button);
  }
}

function showExamples(feature) {
  const box = document.getElementById("examples");
  box.replaceChildren();
  box.className = DATA.kind === "image" ? "image" : "text";
  for (const [value, example, position] of DATA.top[feature]) {
    const attrs = {class: "example", "data-value": String(value), "data-example": example,
                   "data-position": position};
    if (DATA.kind === "image") {
      const shown = DATA.examples[String(example)];
      box.append(el("figure", attrs,
        el("img", {src: shown.image, alt: "example " + example}),
        el("figcaption", {}, el("span", {class: "value"}, format(value)), el("br"),
           shown.label === null ? "example " + example : shown.label)));
    } else {
      const shown = DATA.examples[example + ":" + position];
      box.append(el("div", attrs,
        el("span", {class: "value"}, format(value)),
        shown.left.join(" ") + (shown.left.length ? " " : ""),
        el("mark", {title: "example " + example + ", token " + position}, shown.token),
        (shown.right.length ? " " : "") + shown.right.join(" "),
        shown.label === null ? null : el("span", {class: "label"}, "(" + shown.label + ")")));
    }
  }
}

function showWeights(feature) {
  const box = document.getElementById("weights");
  const title = document.getElementById("weights-title");
  box.replaceChildren();
  if (!DATA.weights) {
    title.textContent = "weights to the outputs";
    box.append(el("p", {class: "note"},
      "The head does not read this read-out point directly."));
    return;
  }
  title.textContent = "weights to the outputs (" + DATA.weights.selection + ")";
  const rows = DATA.weights.features[feature];
  const largest = Math.max(...rows.map(([, w]) => Math.abs(Number(w)) || 0), 1e-12);
  const table = el("table");
  for (const [label, weight] of rows) {
    const size = 12 * (Math.abs(Number(weight)) || 0) / largest;
    const colour = Number(weight) >= 0 ? "#0072B2" : "#D55E00";
    table.append(el("tr", {class: "weight"},
      el("td", {class: "name"}, DATA.weights.labels[label]),
      el("td", {}, el("span", {class: "bar", style: `width:${size}em;background:${colour}`})),
      el("td", {class: "value"}, format(weight))));
  }
  box.append(table);
}

function show(feature) {
  current = feature;
  input.value = feature;
  document.getElementById("shown-feature").textContent = "feature " + feature;
  document.getElementById("prev").disabled = feature <= 0;
  document.getElementById("next").disabled = feature >= DATA.features - 1;
  for (const button of document.querySelectorAll(".jump button")) {
    button.classList.toggle("current", Number(button.dataset.feature) === feature);
  }
  showExamples(feature);
  showWeights(feature);
}

document.getElementById("summary").textContent = DATA.kind === "image"
  ? `The images that activate each of the ${DATA.features} features of read-out point ` +
    `${DATA.layer} most: the top ${DATA.k} of ${DATA.rows}. Open a feature with #feature=<id>.`
  : `The tokens that activate each of the ${DATA.features} features of read-out point ` +
    `${DATA.layer} most: the top ${DATA.k} examples, each once (at its strongest token), among ` +
    `${DATA.rows} tokens (padding ${DATA.include_padding ? "counted" : "excluded"}). Open a ` +
    `feature with #feature=<id>.`;
document.getElementById("feature-count").textContent = "of 0 to " + (DATA.features - 1);
input.max = DATA.features - 1;
jumpList("outlying", "most outlying (largest |x|):",
         DATA.outlying.map(([feature, size]) => [feature, feature + " (" + format(size) + ")"]));
jumpList("named", "named in the config:", DATA.named.map((feature) => [feature, String(feature)]));
input.addEventListener("change", () => choose(Number(input.value)));
document.getElementById("prev").addEventListener("click", () => choose(current - 1));
document.getElementById("next").addEventListener("click", () => choose(current + 1));
window.addEventListener("hashchange", () => {
  const feature = fromHash();
  if (feature !== null && clamp(feature) !== current) show(clamp(feature));
});
const first = fromHash();
show(clamp(first !== null ? first
  : DATA.named.length ? DATA.named[0] : DATA.outlying.length ? DATA.outlying[0][0] : 0));
</script>
</body>
</html>
"""
