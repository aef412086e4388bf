"""configs/census.yaml, today's open models: it validates and resolves through the workflow's own
config code, and its whole DAG builds offline with the jobs it should have. configs/hub_models.yaml:
every Hugging Face checkpoint any shipped config names is recorded there, with the blocks and width
the config states, and every hub dataset with its columns."""

from __future__ import annotations

import pytest
import yaml
from support import REPO, offline_dry_run

from workflow_scripts.plan import resolve
from workflow_scripts.sources import Source, hub_dataset

CENSUS = REPO / "configs/census.yaml"
HUB_MODELS = REPO / "configs/hub_models.yaml"
# the workflow configs the project ships (hub_models.yaml is a record, not a config)
SHIPPED = sorted(path for path in (REPO / "configs").glob("*.yaml") if path != HUB_MODELS)
RECORD_KEYS = {"model_type", "blocks", "width", "parameters", "confirmed_at"}


def census() -> dict:
    return yaml.safe_load(CENSUS.read_text())


def hub_models() -> dict:
    return yaml.safe_load(HUB_MODELS.read_text())["models"]


def hub_id(spec: dict) -> str | None:
    """The hub repository of a model entry (its revision dropped); None for other sources."""
    source = Source.parse(spec["source"])
    return source.location.split("@")[0] if source.scheme == "hf" else None


def pairs(analyses: list[dict]) -> set[tuple[str, str]]:
    return {(m, d) for a in analyses for m in a["models"] for d in a["datasets"]}


def test_the_census_resolves():
    """Every model is a hub decoder in its own dtype, placed by accelerate, with its shape stated;
    every model is measured and ablated on every dataset, drawn in one group, and two or three
    have their top examples drawn at a middle read-out point."""
    config = census()
    study = resolve(config)
    names = set(config["models"])
    assert 10 <= len(names) <= 14
    for name, spec in config["models"].items():
        assert spec["family"] == "decoder", name
        assert hub_id(spec), name
        assert spec["dtype"] == "auto" and spec["device_map"] == "auto", name
        assert study.models[name].readouts == spec["blocks"] + 1, name
        assert study.models[name].size.width == spec["width"], name
    everything = {(m, d) for m in names for d in config["datasets"]}
    assert set(study.statistics) == everything == pairs(config["analyses"])
    assert pairs(config["ablation"]["analyses"]) == everything
    assert any(set(g["models"]) == names for g in config["figures"]["groups"].values())
    top = config["figures"]["top_examples"]
    assert 2 <= len(top) <= 3
    for spec in top:
        readouts = study.models[spec["model"]].readouts
        assert abs(spec["layer"] - readouts // 2) <= 1, spec
    # Gemma 3 27B's massive activations pass float16's range: stored as bfloat16
    assert config["extract"]["dtype"] == "bfloat16"


@pytest.mark.workflow
def test_the_census_builds_offline_with_the_expected_jobs(tmp_path):
    counts, seconds = offline_dry_run(CENSUS, tmp_path)
    config = census()
    study = resolve(config)
    analysed = pairs(config["analyses"])
    expected = {
        "fetch_model": len(config["models"]),
        "prepare_data": len(config["datasets"]),
        "extract": sum(config["datasets"][d]["shards"] for _, d in analysed),
        "layer_stats": sum(study.models[m].readouts for m, _ in analysed),
        "merge_stats": len(analysed),
        "ablate": len(pairs(config["ablation"]["analyses"])),
        "figure_top_examples": len(config["figures"]["top_examples"]),
        "train": None,
    }
    assert {rule: counts.get(rule) for rule in expected} == expected
    assert seconds < 60


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.stem)
def test_every_hub_checkpoint_is_recorded_with_its_shape(path):
    """Each hf: model of a shipped config is in configs/hub_models.yaml, with the blocks and
    width its entry states (where it states them)."""
    records = hub_models()
    for name, spec in yaml.safe_load(path.read_text())["models"].items():
        repo = hub_id(spec)
        if repo is None:
            continue
        assert repo in records, f"{path.name}: {name} ({repo}) is not in {HUB_MODELS.name}"
        for key in ("blocks", "width"):
            if key in spec:
                assert spec[key] == records[repo][key], (path.name, name, key)


def test_every_hub_record_is_complete_and_used():
    """Each record says its model_type, shape, parameter count and where it was read, and
    names a checkpoint some shipped config uses."""
    used = {
        hub_id(spec)
        for path in SHIPPED
        for spec in yaml.safe_load(path.read_text())["models"].values()
    }
    records = hub_models()
    for repo, record in records.items():
        assert RECORD_KEYS <= set(record), repo
        assert record["confirmed_at"].startswith("https://"), repo
        assert isinstance(record["blocks"], int) and isinstance(record["width"], int), repo
        assert isinstance(record["parameters"], float | int) and record["parameters"] > 1e6, repo
    assert set(records) == used - {None}


def test_every_hub_dataset_is_recorded_with_its_columns():
    """Each hf: dataset of a shipped config is in configs/hub_models.yaml with its columns (a
    label column with its names) and where they were read, and each record is used."""
    records = yaml.safe_load(HUB_MODELS.read_text())["datasets"]
    used = set()
    for path in SHIPPED:
        for name, spec in yaml.safe_load(path.read_text())["datasets"].items():
            source = Source.parse(spec["source"])
            if source.scheme == "hf":
                repo = hub_dataset(source.location)[0]
                assert repo in records, f"{path.name}: datasets.{name} ({repo}) is not recorded"
                used.add(repo)
    for repo, record in records.items():
        assert record["confirmed_at"].startswith("https://"), repo
        kinds = set(record["columns"].values())
        assert kinds <= {"string", "int32", "int64", "label"}, repo
        assert ("label" in kinds) == ("label_names" in record), repo
    assert set(records) == used
