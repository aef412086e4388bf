"""Built-in datasets, generated deterministically from a seed; nothing is downloaded.

Three sets, each small enough to make on the fly and each learnable by a tiny model:

- ``pairs``: sentence pairs shaped like MNLI (premise, hypothesis, label in entailment / neutral /
  contradiction). Premises come from a small grammar of people acting on objects in places;
  hypotheses are made from the premise by a rule that decides the label (dropping a detail or
  generalising entails; negating, or changing the place, the object or the actor contradicts;
  adding a detail the premise does not state is neutral).
- ``corpus``: plain English-like text for language modelling, several sentences per row, from a
  grammar with subject-verb number agreement and relative clauses, so a model must learn more than
  word frequencies.
- ``shapes``: 32x32 RGB images of ten classes of shapes and textures (circle, square, triangle,
  cross, ring, horizontal / vertical / diagonal stripes, checkerboard, dots) with random colours,
  sizes, positions and pixel noise.

The two text sets draw their words from the closed vocabulary of
:mod:`workflow_scripts.data.vocabulary`, so a word-level tokenizer built from it covers them
exactly.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pandas as pd
from PIL import Image

from workflow_scripts.data.vocabulary import (
    ADJECTIVES,
    ADVERBS,
    ANIMALS,
    CORPUS_ADJECTIVES,
    CORPUS_VERBS,
    INTRANSITIVE,
    OBJECTS,
    PEOPLE,
    PLACES,
    REASONS,
    TIMES,
    VERBS,
)

PAIR_LABELS = ["entailment", "neutral", "contradiction"]
SHAPE_LABELS = [
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "hstripes",
    "vstripes",
    "diagonal",
    "checkerboard",
    "dots",
]
DEFAULT_ROWS = {"pairs": 2000, "corpus": 2000, "shapes": 2000}


BLOCK_ROWS = 1000  # rows generated from one seeded stream: the same rows whatever the total


def generate(name: str, rows: int | None, seed: int) -> pd.DataFrame:
    """The built-in dataset ``name`` with ``rows`` examples, identical for the same seed."""
    return pd.concat(list(blocks(name, rows, seed)), ignore_index=True)


def blocks(name: str, rows: int | None, seed: int) -> Iterator[pd.DataFrame]:
    """The same rows as :func:`generate`, made ``BLOCK_ROWS`` at a time: block ``b`` comes from
    its own generator seeded by (seed, set, b), so memory stays flat in ``rows``."""
    makers = {"pairs": _pairs, "corpus": _corpus, "shapes": _shapes}
    if name not in makers:
        raise ValueError(f"unknown built-in dataset {name!r}; choose one of {sorted(makers)}")
    rows = DEFAULT_ROWS[name] if rows is None else rows
    for start in range(0, rows, BLOCK_ROWS):
        stop = min(rows, start + BLOCK_ROWS)
        rng = np.random.default_rng([seed, sorted(makers).index(name), start // BLOCK_ROWS])
        frame = makers[name](rng, start, stop)
        frame.insert(0, "example_id", np.arange(start, stop, dtype=np.int64))
        yield frame


def label_names(name: str) -> list[str] | None:
    return {"pairs": PAIR_LABELS, "shapes": SHAPE_LABELS}.get(name)


# --- sentence pairs -------------------------------------------------------------------------


def _pick(rng, items, exclude=None):
    choices = [x for x in items if x != exclude]
    return choices[rng.integers(len(choices))]


def _pair(rng, label: int) -> tuple[str, str]:
    person, adj, obj, place = (
        _pick(rng, PEOPLE),
        _pick(rng, ADJECTIVES),
        _pick(rng, OBJECTS),
        _pick(rng, PLACES),
    )
    past, base = VERBS[rng.integers(len(VERBS))]
    premise = f"the {adj} {person} {past} the {obj} in the {place} ."
    variant = rng.integers(4)
    if label == 0:  # entailment: a detail dropped or generalised
        hypothesis = [
            f"the {person} {past} the {obj} .",
            f"a person {past} the {obj} in the {place} .",
            f"the {adj} {person} {past} something .",
            f"someone {past} the {obj} somewhere .",
        ][variant]
    elif label == 1:  # neutral: a detail the premise does not state
        hypothesis = [
            f"the {person} {past} the {obj} {_pick(rng, TIMES)} .",
            f"the {person} {past} the {obj} because {_pick(rng, REASONS)} .",
            f"the {person} also {past} the {_pick(rng, OBJECTS, obj)} .",
            f"the {person} is {_pick(rng, ADJECTIVES, adj)} .",
        ][variant]
    else:  # contradiction: negated, or another place, object or actor
        hypothesis = [
            f"the {adj} {person} did not {base} the {obj} .",
            f"the {person} {past} the {obj} in the {_pick(rng, PLACES, place)} .",
            f"the {adj} {person} {past} the {_pick(rng, OBJECTS, obj)} in the {place} .",
            f"nobody {past} the {obj} in the {place} .",
        ][variant]
    return premise, hypothesis


def _pairs(rng, start: int, stop: int) -> pd.DataFrame:
    labels = rng.permutation(np.arange(start, stop) % 3)
    texts = [_pair(rng, int(label)) for label in labels]
    return pd.DataFrame(
        {
            "premise": [p for p, _ in texts],
            "hypothesis": [h for _, h in texts],
            "label": labels.astype(np.int64),
        }
    )


# --- text corpus ----------------------------------------------------------------------------


def _noun_phrase(rng, plural: bool) -> str:
    noun = ANIMALS[rng.integers(len(ANIMALS))][int(plural)]
    if rng.random() < 0.5:
        return f"the {_pick(rng, CORPUS_ADJECTIVES)} {noun}"
    return f"the {noun}"


def _sentence(rng) -> str:
    plural = bool(rng.random() < 0.5)
    subject = _noun_phrase(rng, plural)
    if rng.random() < 0.3:  # relative clause: the verb after it still agrees with the subject
        inner_plural = bool(rng.random() < 0.5)
        inner_verb = CORPUS_VERBS[rng.integers(len(CORPUS_VERBS))][int(inner_plural)]
        subject = f"{subject} that {_noun_phrase(rng, inner_plural)} {inner_verb}"
    if rng.random() < 0.4:
        verb = INTRANSITIVE[rng.integers(len(INTRANSITIVE))][int(plural)]
        tail = f"{verb} {_pick(rng, ADVERBS)}" if rng.random() < 0.5 else verb
    else:
        verb = CORPUS_VERBS[rng.integers(len(CORPUS_VERBS))][int(plural)]
        tail = f"{verb} {_noun_phrase(rng, bool(rng.random() < 0.5))}"
    return f"{subject} {tail} ."


def _corpus(rng, start: int, stop: int) -> pd.DataFrame:
    texts = [
        " ".join(_sentence(rng) for _ in range(rng.integers(3, 7))) for _ in range(start, stop)
    ]
    return pd.DataFrame({"text": texts})


# --- shapes ---------------------------------------------------------------------------------

SIZE = 32


def _shape_mask(rng, label: int) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    radius = rng.uniform(6, 11)
    cy, cx = rng.uniform(radius + 1, SIZE - radius - 1, size=2)
    dy, dx = yy - cy, xx - cx
    dist = np.hypot(dy, dx)
    period = rng.uniform(4, 7)
    phase = rng.uniform(0, period)
    name = SHAPE_LABELS[label]
    if name == "circle":
        return dist <= radius
    if name == "square":
        return (np.abs(dy) <= radius * 0.8) & (np.abs(dx) <= radius * 0.8)
    if name == "triangle":
        return (dy <= radius * 0.7) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    if name == "cross":
        arm = radius * 0.3
        within = np.maximum(abs(dy), abs(dx)) <= radius
        return ((np.abs(dy) <= arm) | (np.abs(dx) <= arm)) & within
    if name == "ring":
        return (dist <= radius) & (dist >= radius * 0.55)
    if name == "hstripes":
        return ((yy + phase) % period) < period / 2
    if name == "vstripes":
        return ((xx + phase) % period) < period / 2
    if name == "diagonal":
        return ((xx + yy + phase) % (period * 1.4)) < period * 0.7
    if name == "checkerboard":
        return (((yy + phase) // period + (xx + phase) // period) % 2) == 0
    # dots: a lattice of small discs
    oy, ox = (yy + phase) % (period + 2), (xx + phase) % (period + 2)
    return np.hypot(oy - (period + 2) / 2, ox - (period + 2) / 2) <= 1.5


def _colours(rng) -> tuple[np.ndarray, np.ndarray]:
    while True:
        fg, bg = rng.uniform(0, 255, size=(2, 3))
        if np.abs(fg - bg).sum() > 200:
            return fg, bg


def _shape_image(rng, label: int) -> bytes:
    mask = _shape_mask(rng, label)[..., None]
    fg, bg = _colours(rng)
    pixels = np.where(mask, fg, bg) + rng.normal(0, 12, size=(SIZE, SIZE, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _shapes(rng, start: int, stop: int) -> pd.DataFrame:
    labels = rng.permutation(np.arange(start, stop) % len(SHAPE_LABELS))
    images = [_shape_image(rng, int(label)) for label in labels]
    return pd.DataFrame({"image": images, "label": labels.astype(np.int64)})
