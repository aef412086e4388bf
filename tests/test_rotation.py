"""The structured rotation (stats.rotation: structured) against the dense Haar rotation: it is
orthogonal at every width the configurations use, seeded, and mixes a few large coordinates
across all features as a Haar-random basis does, for the rotated kurtosis."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from support import stats_options

from workflow_scripts.activations import ShardWriter
from workflow_scripts.layer_stats import compute
from workflow_scripts.models.adapter import Readout
from workflow_scripts.rotations import StructuredRotation, make_rotation, random_rotation
from workflow_scripts.streaming_stats import LayerStatistics, row_kurtosis

# the stream widths of the configured models (RoBERTa, GPT-2, ResNet stages, decoders, the
# trained and the tiny test models), and widths with a large odd part
WIDTHS = [768, 1024, 896, 2048, 384, 64, 128, 256, 512, 8, 16, 32, 100, 3, 2]
WIDTHS += [3072, 3584, 4096, 5376, 8192]  # today's open models (configs/census.yaml)
DRAWS = 20
ROOT = Path(__file__).resolve().parents[1]


def _declared_widths(node) -> set[int]:
    """Every ``width`` and ``widths`` value in a parsed config."""
    if isinstance(node, list):
        return set().union(*map(_declared_widths, node)) if node else set()
    if not isinstance(node, dict):
        return set()
    found = set().union(*map(_declared_widths, node.values())) if node else set()
    if isinstance(node.get("width"), int):
        found.add(node["width"])
    if isinstance(node.get("widths"), list):
        found |= set(node["widths"])
    return found


def test_the_widths_tested_include_every_configured_width():
    configs = [ROOT / "config.yaml", *(ROOT / "configs").glob("*.yaml")]
    configs += (ROOT / "tests" / "configs").glob("*.yaml")
    declared = set().union(*(_declared_widths(yaml.safe_load(p.read_text())) for p in configs))
    assert declared >= {768, 1024, 384, 64}  # the walk finds the models' widths
    assert declared <= set(WIDTHS), sorted(declared - set(WIDTHS))


@pytest.mark.parametrize("width", WIDTHS)
def test_structured_rotation_is_orthogonal(width):
    # the images of the basis vectors (of 512 of them, chosen at random, for a wide stream)
    chosen = np.sort(np.random.default_rng(width).permutation(width)[:512])
    q = StructuredRotation(width, 0, 1, 0)(torch.eye(width)[chosen]).double()
    np.testing.assert_allclose(q @ q.T, np.eye(len(chosen)), atol=1e-6)
    x = torch.randn(5, width)
    norms = torch.linalg.vector_norm(StructuredRotation(width, 0, 1, 0)(x), dim=1)
    # float32 sums over up to 8192 features
    torch.testing.assert_close(norms, torch.linalg.vector_norm(x, dim=1), rtol=1e-5, atol=1e-5)


def test_structured_rotation_is_seeded_per_seed_layer_and_index():
    x = torch.randn(4, 96)
    q = StructuredRotation(96, 3, 2, 1)(x)
    torch.testing.assert_close(StructuredRotation(96, 3, 2, 1)(x), q, rtol=0, atol=0)
    for other in [(4, 2, 1), (3, 5, 1), (3, 2, 0)]:
        assert not torch.allclose(StructuredRotation(96, *other)(x), q)
    assert torch.equal(x, x.clone())  # the input is kept


def test_an_unknown_rotation_is_refused():
    with pytest.raises(ValueError, match="haar, structured"):
        make_rotation("hadamard", 8, 0, 0, 0)


@functools.cache
def _inputs(width: int) -> dict[str, torch.Tensor]:
    """Rows dominated by a few coordinates, which only a rotation that mixes them across all
    features brings near a Gaussian's kurtosis."""
    rng = np.random.default_rng(width)
    gaussian = rng.standard_normal((512, width)).astype(np.float32)
    one_hot = np.eye(width, dtype=np.float32)[rng.choice(width, 256, replace=False)]
    scaled = gaussian.copy()
    scaled[:, [3, 100, 500]] *= 40  # a few features 40x the others
    shifted = gaussian.copy()
    shifted[:, [7, 300, 601]] += 100 * rng.choice([-1, 1], (512, 3))  # outlier columns
    inputs = {"one-hot": one_hot, "a few features 40x": scaled, "outlier columns": shifted}
    return {name: torch.from_numpy(x) for name, x in inputs.items()}


def _mean_rotated_kurtosis(kind: str, width: int) -> dict[str, np.ndarray]:
    """Per input: the mean over rows of the rotated kurtosis, for each of DRAWS seeds."""
    means = {name: [] for name in _inputs(width)}
    for seed in range(DRAWS):
        rotate = make_rotation(kind, width, seed, 0, 0)
        for name, x in _inputs(width).items():
            means[name].append(float(row_kurtosis(rotate(x)).mean()))
    return {name: np.array(m) for name, m in means.items()}


@pytest.mark.parametrize("width", [768, 1024, 896])
def test_structured_rotation_mixes_large_coordinates_as_haar_does(width):
    """The means over 20 draws of each are within 0.05 (the draws' standard errors are 0.002
    to 0.02 here). A transform that mixes too little fails: one round, no signs between the
    windows (768, 896), or no permutations (896: one-hot rows at 3.55 against 2.99)."""
    haar = _mean_rotated_kurtosis("haar", width)
    structured = _mean_rotated_kurtosis("structured", width)
    for name, x in _inputs(width).items():
        assert float(row_kurtosis(x).mean()) > 10, name  # unrotated: far from Gaussian
        assert abs(structured[name].mean() - haar[name].mean()) < 0.05, name
        assert abs(structured[name].mean() - 3) < 0.1, name


@pytest.mark.parametrize("width", [768, 1024])
def test_an_isotropic_gaussian_keeps_its_kurtosis(width):
    """Any orthogonal map keeps an isotropic Gaussian: the sample kurtosis of n values is
    3 (n - 1) / (n + 1) on average with sd about sqrt(24 / n) (0.18 at 768), so over 4000 rows
    the mean's standard error is 0.003: allow 0.015."""
    x = torch.from_numpy(np.random.default_rng(9).standard_normal((4000, width), np.float32))
    expected = 3 * (width - 1) / (width + 1)
    for kind in ("haar", "structured"):
        kurtosis = float(row_kurtosis(make_rotation(kind, width, 0, 0, 0)(x)).mean())
        assert abs(kurtosis - expected) < 0.015, kind


def value(frame: pd.DataFrame, metric: str, setting: str) -> float:
    rows = frame[(frame["metric"] == metric) & (frame["setting"] == setting)]
    assert len(rows) == 1, rows
    return float(rows["value"].iloc[0])


def test_layer_statistics_take_rotations_or_matrices():
    x = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)
    x[:, 3] *= 30
    results = []
    for rotation in (random_rotation(48, 0, 0, 0), make_rotation("haar", 48, 0, 0, 0)):
        stats = LayerStatistics(48, [rotation])
        stats.update(x, np.arange(64))
        frame = pd.DataFrame(stats.results([1.0], 1))
        results.append(value(frame, "rotated_kurtosis", "mean of 1 rotation(s)"))
    assert results[0] == results[1]


def test_layer_stats_with_the_structured_rotation(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 96)).astype(np.float32)
    x[:, 5] = 50.0 + rng.standard_normal(1000)  # a massive activation in every row
    readouts = [Readout(0, 0, 0, "block.0", 96)]
    writer = ShardWriter(tmp_path / "s.zarr", readouts, 1000, "float32", 64, 2)
    writer.append([x], np.arange(1000) // 4, np.zeros(1000, np.int32), np.zeros(1000, bool))
    writer.close({"readouts": [r.as_dict() for r in readouts]})
    # the rows are nearly one fixed vector (the massive activation, rotated): their kurtosis
    # varies with the rotation by about 0.45 (a Gaussian sample of 96), so 16 rotations
    options = stats_options(include_padding=False, rotations=16, seed=0, top_features=3)
    frames = {
        kind: compute([tmp_path / "s.zarr"], 0, [10.0], replace(options, rotation=kind))
        for kind in ("haar", "structured")
    }
    unrotated = [("kurtosis", "standard basis"), ("rms", "row mean")]
    for metric, setting in unrotated:  # the same whatever the rotation
        assert value(frames["haar"], metric, setting) == value(
            frames["structured"], metric, setting
        )
    assert value(frames["structured"], "kurtosis", "standard basis") > 40
    # the per-rotation means spread (rotated_kurtosis_sd): compare within 3 standard errors
    (haar, structured), (haar_sd, structured_sd) = (
        [value(f, metric, setting) for f in frames.values()]
        for metric, setting in [
            ("rotated_kurtosis", "mean of 16 rotation(s)"),
            ("rotated_kurtosis_sd", "sd over 16 rotation(s)"),
        ]
    )
    assert abs(structured - 3) < 0.4 and abs(haar - 3) < 0.4
    assert abs(structured - haar) < 3 * np.hypot(haar_sd, structured_sd) / 4  # 3 errors
