"""Shared fixtures: tiny random-initialised models of every family and tiny datasets."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from support import REPO, TINY_SPECS

from workflow_scripts.data import builtin, store
from workflow_scripts.fetch_model import fetch


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
    for name, kind, rows in (
        ("pairs", "pairs", 24),
        ("corpus", "text", 12),
        ("shapes", "image", 20),
    ):
        files[name] = root / f"{name}.parquet"
        store.write(
            builtin.generate(name, rows, seed=0), files[name], kind, builtin.label_names(name)
        )
    return files


@pytest.fixture
def default_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())
