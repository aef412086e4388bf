"""Shared fixtures: tiny random-initialised models of every family and tiny datasets."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
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


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium driven through Selenium, with the system's chromium and chromedriver
    (Debian's chromium and chromium-driver, installed with apt-get when absent: no browser is
    downloaded from anywhere else). A failed install fails the test."""
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        sudo = ["sudo"] if os.geteuid() != 0 and shutil.which("sudo") else []
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"],
        ):
            result = subprocess.run(sudo + command, capture_output=True, text=True, env=environment)
            if result.returncode != 0:
                pytest.fail(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    yield driver
    driver.quit()
