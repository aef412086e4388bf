"""Shared fixtures: tiny random-initialised models of every family and tiny datasets."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from workflow_scripts.data import builtin, table
from workflow_scripts.fetch_model import fetch

REPO = Path(__file__).resolve().parents[1]

TINY_TEXT_ARCH = {"layers": 2, "width": 32, "heads": 2, "context": 64}
TINY_SPECS = {
    "gpt2": {"family": "gpt2", "source": "init:", "arch": TINY_TEXT_ARCH, "seed": 0},
    "gptr2": {"family": "gptr2", "source": "init:", "arch": TINY_TEXT_ARCH, "seed": 0},
    "roberta": {"family": "roberta", "source": "init:", "arch": TINY_TEXT_ARCH, "seed": 0,
                "head": "sequence_classification", "num_labels": 3},
    "bert": {"family": "bert", "source": "init:", "arch": TINY_TEXT_ARCH, "seed": 0,
             "head": "sequence_classification", "num_labels": 3},
    "resnet": {"family": "resnet", "source": "init:", "seed": 0, "num_labels": 10,
               "arch": {"block": "basic", "layers": [1, 2], "widths": [8, 16], "stem": "cifar"}},
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A stored tiny model of every family, built once per test session."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for family, spec in TINY_SPECS.items():
        dirs[family] = root / family
        fetch(copy.deepcopy(spec), dirs[family])
    return dirs


@pytest.fixture(scope="session")
def dataset_files(tmp_path_factory) -> dict[str, Path]:
    """The three built-in datasets, small, in the stored Parquet layout."""
    root = tmp_path_factory.mktemp("data")
    files = {}
    for name, kind, rows in (("pairs", "pairs", 24), ("corpus", "text", 12), ("shapes", "image", 20)):
        files[name] = root / f"{name}.parquet"
        table.write(builtin.generate(name, rows, seed=0), files[name], kind,
                    builtin.label_names(name))
    return files


@pytest.fixture
def default_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())
