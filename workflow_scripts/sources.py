"""Sources (``scheme:location``) of models and datasets, parsed once into a ``Source``, and what
data a dataset holds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# what the rows of each built-in dataset hold
BUILTIN_KINDS = {"pairs": "pairs", "corpus": "text", "shapes": "image"}
# the head a model needs to be scored on each kind of dataset by ablation
ABLATION_HEADS = {
    "pairs": "sequence_classification",
    "image": "image_classification",
    "text": "causal_lm",
}


@dataclass(frozen=True)
class Source:
    """Where a model or dataset comes from: ``"hf:gpt2@main"`` is ``Source("hf", "gpt2@main")``.

    ``location`` is what follows the scheme: a repository, a path, an architecture, a training
    run's or a built-in dataset's name (empty for ``init:``)."""

    scheme: str
    location: str

    @classmethod
    def parse(cls, text: str) -> Source:
        scheme, _, location = text.partition(":")
        return cls(scheme, location)

    def __str__(self) -> str:
        return f"{self.scheme}:{self.location}"

    @property
    def run(self) -> str | None:
        """The training run that makes a ``train:`` model (``train:<run>``, or a snapshot of it,
        ``train:<run>@<step>``); None for any other source."""
        return self.location.partition("@")[0] if self.scheme == "train" else None

    @property
    def step(self) -> int | None:
        """The step of a snapshot of a training run (``train:<run>@<step>``), else None."""
        if self.scheme != "train" or "@" not in self.location:
            return None
        return int(self.location.partition("@")[2])

    @property
    def holds(self) -> str | None:
        """What a dataset from this source holds where the source says (``builtin:``,
        ``imagefolder:``); None where the dataset's ``kind`` key must."""
        if self.scheme == "builtin":
            return BUILTIN_KINDS.get(self.location)
        if self.scheme == "imagefolder":
            return "image"
        return None


def hub_dataset(location: str) -> tuple[str, str | None, str]:
    """(repository, config or None, split) of an ``hf:`` dataset's location,
    ``<name>``, ``<owner>/<name>`` or ``<owner>/<name>/<config>``, then ``:<split>`` (a
    repository has no ':'; a split may: ``train[:100]``)."""
    path, _, split = location.partition(":")
    parts = path.split("/")
    return "/".join(parts[:2]), (parts[2] if len(parts) > 2 else None), split


def dataset_kind(spec: Mapping) -> str:
    """pairs, text or image: given by the source where it can, else by the ``kind`` key."""
    return Source.parse(spec["source"]).holds or spec["kind"]
