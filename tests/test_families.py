"""The family registry: adding a family is one module and one registry entry.

A throwaway image family (residual MLP blocks on an image's mean colour) is registered in memory
for validation and planning, and added to a copy of the workflow, as a contributor would add one
(one new module under workflow_scripts/models/, one record module under
workflow_scripts/families/, nothing else), which then runs through the DAG, fetching,
extraction, statistics and ablation.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from support import copy_workflow, snakemake

from workflow_scripts import families
from workflow_scripts.activations import open_shard
from workflow_scripts.batches import preprocess_image
from workflow_scripts.config import ConfigError, validate
from workflow_scripts.data import store
from workflow_scripts.plan import resolve

TOY_MODULE = '''"""A throwaway family: residual MLP blocks on an image's mean colour."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workflow_scripts.models.adapter import Adapter, Readout

PREPROCESS = {"resize": None, "crop": None, "mean": [0.5] * 3, "std": [0.5] * 3}


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(width, width), nn.Tanh())

    def forward(self, x):
        return x + 4 * self.branch(x)


class Net(nn.Module):
    def __init__(self, width, blocks, classes):
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, classes)

    def forward(self, pixels):
        x = self.embed(pixels.mean(dim=(2, 3)))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _net(config):
    model = Net(config["width"], config["layers"], config["classes"])
    model.config = config
    return model


def init(spec, tokenizer=None):
    torch.manual_seed(spec.get("seed", 0))
    arch = spec["arch"]
    config = {"width": arch["width"], "layers": arch["layers"], "classes": spec["num_labels"]}
    return _net(config).eval(), None


def write(model, tokenizer, directory):
    save_file(model.state_dict(), Path(directory, "model.safetensors"))
    Path(directory, "config.json").write_text(json.dumps(model.config))


def load(directory, family, head=None, num_labels=None, dtype=None):
    model = _net(json.loads(Path(directory, "config.json").read_text()))
    model.load_state_dict(load_file(Path(directory, "model.safetensors")))
    return model.to(getattr(torch, dtype or "float32")).eval(), None


class Skip(nn.Module):
    def forward(self, x):
        return x


class ToyAdapter(Adapter):
    modality, pooling, head = "image", "none", "image_classification"

    def __init__(self, model):
        super().__init__(model)
        self.preprocess = PREPROCESS
        self.num_labels = model.head.out_features
        self.block_slots = [(model.blocks, i) for i in range(len(model.blocks))]
        width = model.config["width"]
        self.readouts = [Readout(i, 0, i, f"blocks.{i}", width) for i in range(len(model.blocks))]

    def streams(self, inputs):
        x = self.model.embed(inputs["pixel_values"].mean(dim=(2, 3)))
        out = []
        for container, i in self.block_slots:
            x = container[i](x)
            out.append(x)
        return out

    def forward(self, inputs):
        return self.model(inputs["pixel_values"])

    logits = forward

    def without_branch(self, block):
        return Skip()

    def blocks_applied(self, readout):
        return readout + 1


def adapter(model, tokenizer, family, final_readout):
    return ToyAdapter(model)
'''

TOY_RECORD = """\"\"\"A throwaway family's record.\"\"\"

from workflow_scripts.families import Family, register, transformer_size

register(
    Family(
        name="toy",
        module="workflow_scripts.models.toy_mlp",
        modality="image",
        default_head="image_classification",
        heads={"image_classification": None},
        threshold=3,
        arch_required=("layers", "width"),
        arch_optional=(),
        check_arch=lambda where, arch: None,
        estimate=transformer_size,
        embedding_readout=False,
    )
)
"""

TOY_CONFIG = {
    "models": {
        "toy-init": {"family": "toy", "source": "init:", "arch": {"layers": 3, "width": 8},
                     "num_labels": 10},
    },
    "datasets": {"shapes": {"source": "builtin:shapes", "rows": 12, "shards": 2}},
    "analyses": [{"models": ["toy-init"], "datasets": ["shapes"]}],
    "extract": {"batch_size": 4, "dtype": "float32"},
    "ablation": {"analyses": [{"models": ["toy-init"], "datasets": ["shapes"]}]},
    "figures": {"groups": {"toys": {"models": ["toy-init"], "datasets": ["shapes"],
                                    "figures": ["kurtosis", "ablation"]}}},
}  # fmt: skip


def toy_family(**changes) -> families.Family:
    """The throwaway family's record, as TOY_RECORD registers it."""
    record = families.Family(
        name="toy", module="workflow_scripts.models.toy_mlp", modality="image",
        default_head="image_classification", heads={"image_classification": None}, threshold=3,
        arch_required=("layers", "width"), arch_optional=(),
        check_arch=lambda where, arch: None, estimate=families.transformer_size,
        embedding_readout=False,
    )  # fmt: skip
    return dataclasses.replace(record, **changes)


@pytest.fixture
def registered(monkeypatch):
    """The toy family in the registry for one test."""
    monkeypatch.setitem(families.FAMILIES, "toy", toy_family())


def test_a_registered_family_is_validated_and_planned(registered):
    study = resolve(TOY_CONFIG)
    model = study.models["toy-init"]
    assert model.family.module == "workflow_scripts.models.toy_mlp"
    assert model.readouts == 3 and model.thresholds == (3.0,)
    assert study.ablations == (("toy-init", "shapes"),)
    bad = yaml.safe_load(yaml.safe_dump(TOY_CONFIG))
    bad["models"]["toy-init"]["arch"]["widths"] = [4]
    with pytest.raises(ConfigError, match=r"toy-init\.arch\.widths: not a setting of family toy"):
        validate(bad)
    bad["models"]["toy-init"]["arch"] = {"layers": 3}
    with pytest.raises(ConfigError, match="missing key 'width' for family toy"):
        validate(bad)


def test_an_unregistered_family_is_refused():
    with pytest.raises(
        ConfigError, match="unknown model family 'toy'; known: bert, decoder, gpt2, gptr2"
    ):
        validate(TOY_CONFIG)


def test_the_registry_refuses_a_name_twice_and_a_default_head_it_lacks(registered):
    with pytest.raises(ValueError, match="registered twice"):
        families.register(toy_family())
    with pytest.raises(ValueError, match="default head"):
        families.register(toy_family(name="toy2", default_head="causal_lm"))


@pytest.mark.workflow
def test_a_new_family_is_one_module_and_one_entry(tmp_path):
    checkout, workdir = tmp_path / "checkout", tmp_path / "work"
    copy_workflow(checkout)
    # the two changes a contributor makes
    (checkout / "workflow_scripts/models/toy_mlp.py").write_text(TOY_MODULE)
    (checkout / "workflow_scripts/families/toy.py").write_text(TOY_RECORD)

    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(TOY_CONFIG))
    # its jobs run the copy's package
    result = snakemake(workdir, snakefile=checkout / "Snakefile", PYTHONPATH=str(checkout))
    assert result.returncode == 0, result.stderr[-4000:]

    stats = pd.read_parquet(workdir / "results/stats/toy-init/shapes.parquet")
    assert sorted(stats["layer"].unique()) == [0, 1, 2]
    assert "signed x > 3" in set(stats["setting"])  # the family's own default threshold
    ablation = pd.read_parquet(workdir / "results/ablation/toy-init/shapes.parquet")
    assert set(ablation["direction"]) == {"head", "tail"}
    assert (workdir / "results/figures/ablation-toys.png").exists()

    # the stored stream is the toy model's own, computed here from its module
    spec = importlib.util.spec_from_file_location(
        "toy_mlp", checkout / "workflow_scripts/models/toy_mlp.py"
    )
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    model, _ = toy.load(workdir / "results/models/toy-init", "toy")
    frame, _, _ = store.read(workdir / "results/data/shapes.parquet")
    pixels = torch.stack([preprocess_image(store.decode_image(b, "test"), toy.PREPROCESS)
                          for b in frame["image"]])  # fmt: skip
    with torch.no_grad():
        expected = toy.ToyAdapter(model).streams({"pixel_values": pixels})
    shards = [open_shard(workdir / f"results/activations/toy-init/shapes/shard-{s}.zarr")
              for s in (0, 1)]  # fmt: skip
    for k in range(3):
        stored = np.concatenate([shard[f"layer-{k}"][:] for shard in shards])
        np.testing.assert_allclose(stored, expected[k].numpy(), rtol=1e-6, atol=1e-6)
