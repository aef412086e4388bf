"""A model split over devices by accelerate (``models.<name>.device_map``): on this CPU machine,
part of it on the CPU and the rest offloaded to the disk (run on the CPU block by block), which
must give the whole model's stream, ablation, logit lens and unembedding; the plan, the cache
key, the job's resources and the estimate that follow from a placement."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from support import ABLATION_OPTIONS, EXTRACT_OPTIONS, TINY_SPECS

from workflow_scripts import extract as extraction
from workflow_scripts.ablate import ablate
from workflow_scripts.activations import layer_name, open_shard
from workflow_scripts.config import ConfigError
from workflow_scripts.estimate import job_resources, table
from workflow_scripts.fetch_model import fetch
from workflow_scripts.models import load_adapter
from workflow_scripts.models.placement import weights_in_files
from workflow_scripts.options.ablation import AblationOptions
from workflow_scripts.options.extract import ExtractOptions
from workflow_scripts.options.placement import Placement, gpus_needed
from workflow_scripts.output_cache import job_key
from workflow_scripts.plan import resolve
from workflow_scripts.stage import InputError

DECODER = {
    "family": "decoder",
    "source": "init:",
    "arch": {"type": "llama", "layers": 3, "width": 32, "heads": 2, "context": 64},
    "seed": 0,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory, model_dirs) -> dict:
    """A tiny decoder of its own (three blocks) and the session's gpt2, bert and resnet."""
    root = tmp_path_factory.mktemp("placement")
    fetch(copy.deepcopy(DECODER), root / "decoder")
    return {"decoder": root / "decoder", **model_dirs}


def half_on_disk(model_dir) -> Placement:
    """accelerate's ``auto`` map with the CPU capped at half the weights: the rest offloaded to
    the disk, run on the CPU when its turn comes."""
    adapter, _ = load_adapter(model_dir)
    weights = sum(p.numel() * p.element_size() for p in adapter.model.parameters())
    return Placement(device_map="auto", max_memory={"cpu": weights // 2})


def test_a_split_model_is_really_split(models):
    adapter, _ = load_adapter(models["decoder"], placement=half_on_disk(models["decoder"]))
    placed = set(adapter.model.hf_device_map.values())
    assert adapter.split and placed == {"cpu", "disk"}, adapter.model.hf_device_map
    assert any(p.device.type == "meta" for p in adapter.model.parameters())  # left in the file
    assert adapter.device == torch.device("cpu")  # where inputs go and offloaded blocks run
    assert adapter.place("cpu") == torch.device("cpu")  # a split model is not moved


@pytest.mark.parametrize("family,dataset", [("decoder", "corpus"), ("gpt2", "pairs")])
def test_the_stream_of_a_split_model_is_the_whole_models(
    models, dataset_files, tmp_path, family, dataset
):
    options = ExtractOptions(**{**EXTRACT_OPTIONS, "dtype": "float32"})
    shards = {}
    for name, placement in (("whole", None), ("split", half_on_disk(models[family]))):
        out = tmp_path / f"{name}.zarr"
        extraction.extract(
            models[family], dataset_files[dataset], 0, 1, out, options, placement=placement
        )
        shards[name] = open_shard(out)
    whole, split = shards["whole"], shards["split"]
    assert whole.attrs["readouts"] == split.attrs["readouts"]
    for k in range(len(whole.attrs["readouts"])):
        expected = whole[layer_name(k)][:]
        assert np.abs(expected).max() > 0
        np.testing.assert_array_equal(split[layer_name(k)][:], expected)
    for column in ("example_id", "position", "is_padding"):
        np.testing.assert_array_equal(split[column][:], whole[column][:])


@pytest.mark.parametrize("family,dataset", [("decoder", "corpus"), ("bert", "pairs")])
def test_ablation_and_the_logit_lens_of_a_split_model_are_the_whole_models(
    models, dataset_files, family, dataset
):
    options = AblationOptions(**ABLATION_OPTIONS)
    whole = ablate(models[family], dataset_files[dataset], options)
    split = ablate(
        models[family], dataset_files[dataset], options, placement=half_on_disk(models[family])
    )
    assert len(whole) > 2 * len(whole["layer"].unique()) - 1
    pd.testing.assert_frame_equal(split, whole)
    if family == "decoder":  # the logit lens changes with the blocks (a random classifier's
        assert whole["value"].nunique() > 1  # accuracy is the same class for every input)


def test_figures_read_a_split_models_unembedding_from_its_files(models):
    whole, _ = load_adapter(models["decoder"])
    placement = weights_in_files(half_on_disk(models["decoder"]))
    assert placement.device_map == {"": "disk"}
    in_files, _ = load_adapter(models["decoder"], placement=placement)
    assert all(p.device.type == "meta" for p in in_files.model.parameters())  # nothing read
    kind, expected = whole.output_weights(2)
    assert in_files.output_weights(2)[0] == kind == "token"
    torch.testing.assert_close(in_files.output_weights(2)[1], expected, rtol=0, atol=0)
    assert weights_in_files(Placement(gpus=2)) is None  # a model that is not split loads whole


@pytest.mark.parametrize("family", ["gptr2", "resnet"])
def test_families_that_load_whole_refuse_a_split(models, family):
    with pytest.raises(InputError, match=f"family '{family}' cannot be split"):
        load_adapter(models[family], placement=Placement(device_map="auto"))


def config_with(**model) -> dict:
    """A one-model config: a 7B-shaped hub decoder with ``model``'s settings."""
    return {
        "models": {
            "big": {"family": "decoder", "source": "hf:org/big", "blocks": 32, "width": 4096}
            | model
        },
        "datasets": {"corpus": {"source": "builtin:corpus", "rows": 10}},
        "analyses": [{"models": ["big"], "datasets": ["corpus"]}],
        "ablation": {"analyses": [{"models": ["big"], "datasets": ["corpus"]}]},
    }


def test_the_plan_asks_for_the_gpus_a_split_model_needs():
    plain = resolve(config_with()).models["big"]
    assert plain.placement == Placement(gpus=1)
    auto = resolve(config_with(dtype="bfloat16", device_map="auto")).models["big"]
    parameters = auto.size.parameters
    assert auto.placement.gpus == gpus_needed(parameters, 2) == 1  # 7B in bfloat16: 14 GB
    wide = resolve(config_with(dtype="float32", device_map="auto", width=16384)).models["big"]
    expected = int(np.ceil(wide.size.parameters * 4 * 1.2 / 80e9))
    assert wide.placement.gpus == expected > 1
    mapped = resolve(
        config_with(device_map={"model.layers.0": 0, "lm_head": "cpu"}, max_memory={0: "70GiB"})
    ).models["big"]
    assert mapped.placement.device_map == {"model.layers.0": 0, "lm_head": "cpu"}
    assert mapped.placement.max_memory == {"0": "70GiB"}
    assert resolve(config_with(device_map="auto", gpus=4)).models["big"].placement.gpus == 4


def test_a_placement_the_model_cannot_take_is_a_config_error():
    with pytest.raises(ConfigError, match="max_memory.*device_map"):
        resolve(config_with(max_memory={"cpu": "10GiB"}))
    gptr2 = {**TINY_SPECS["gptr2"], "device_map": "auto"}
    with pytest.raises(ConfigError, match="models.big.device_map.*'gptr2' cannot be split"):
        resolve({**config_with(), "models": {"big": gptr2}})
    with pytest.raises(ConfigError):
        resolve(config_with(device_map="everywhere"))


def test_jobs_ask_the_cluster_for_the_gpus_and_hold_no_weights_of_a_split_model():
    config = config_with(dtype="float32", device_map="auto", width=16384)
    study = resolve(config)
    gpus = study.models["big"].placement.gpus
    whole = resolve(config_with(dtype="float32", width=16384))
    for stage in ("extract", "ablate"):
        split = job_resources(study, stage, "big", "corpus")
        alone = job_resources(whole, stage, "big", "corpus")
        assert split["gpu"] == gpus and alone["gpu"] == 1
        weights_mb = study.models["big"].size.parameters * 4 / 2**20
        assert alone["mem_mb"] - split["mem_mb"] > weights_mb  # weights on the GPUs, not here
    capped = config_with(
        dtype="float32", device_map="auto", width=16384, max_memory={"cpu": "100GiB"}
    )
    with_cpu = job_resources(resolve(capped), "extract", "big", "corpus")["mem_mb"]
    assert with_cpu - job_resources(study, "extract", "big", "corpus")["mem_mb"] >= 100 * 1024
    rows = {row["stage"]: row for row in table(study)}
    one = {row["stage"]: row for row in table(whole)}
    assert rows["extract"]["gpus_per_job"] == gpus
    assert rows["extract"]["gpu_hours"] == pytest.approx(gpus * one["extract"]["gpu_hours"])


def test_where_a_model_runs_is_not_part_of_a_jobs_cache_key(tmp_path):
    data = tmp_path / "data.parquet"
    data.write_bytes(b"rows")
    inputs = {"data": str(data)}
    whole = {"options": "{}", "placement": '{"device_map": null, "gpus": 1}'}
    split = {"options": "{}", "placement": '{"device_map": "auto", "gpus": 4}'}
    assert job_key("extract", inputs, whole) == job_key("extract", inputs, split)
    assert job_key("extract", inputs, whole) != job_key("extract", inputs, {"options": "[]"})
