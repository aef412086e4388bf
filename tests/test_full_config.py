"""configs/full.yaml: the whole study's DAG builds offline, in seconds, with the jobs it should have."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO
from workflow_scripts.config import check_config
from workflow_scripts.estimate import table

FULL = REPO / "configs/full.yaml"
# read-out points: transformers their blocks + 1, torchvision ResNets their blocks
TORCHVISION_BLOCKS = {"resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet101": 33, "resnet152": 50}


def readouts(config, model):
    spec = config["models"].get(model)
    if spec is None:  # a training run
        run = next(r for name, r in config["training"]["runs"].items()
                   if model == name or model.startswith(name + "-"))
        if run["kind"] == "image_classification":
            return sum(run["arch"]["layers"])
        if run["kind"] == "causal_lm":
            return run["arch"]["layers"] + 1
        return readouts(config, run["base"])
    if spec["source"].startswith("torchvision:"):
        return TORCHVISION_BLOCKS[spec["source"].split(":")[1]]
    return spec["blocks"] + 1


def pairs(analyses):
    return {(m, d) for a in analyses for m in a["models"] for d in a["datasets"]}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "https_proxy": "http://0.0.0.0:9", "http_proxy": "http://0.0.0.0:9"}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
         "--directory", str(workdir), "--configfile", str(FULL), "-n", "--quiet", "rules"],
        capture_output=True, text=True, timeout=300, env=environment)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-4000:]
    counts = {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", result.stdout + result.stderr, re.M)}
    return counts, seconds


def test_the_whole_study_builds_offline_with_the_expected_jobs(dry_run):
    counts, seconds = dry_run
    config = yaml.safe_load(FULL.read_text())
    runs = config["training"]["runs"]
    grid = runs["gptr2-nano"]["grid"]
    trained = len(runs) - 1 + len(grid["momentum"]) * len(grid["decay"])
    analysed = pairs(config["analyses"])
    figures = sum(len(g["figures"]) for g in config["figures"]["groups"].values())
    expected = {
        "fetch_model": len(config["models"]),
        "prepare_data": len(config["datasets"]),
        "train": trained,
        "extract": sum(config["datasets"][d]["shards"] for _, d in analysed),
        "layer_stats": sum(readouts(config, m) for m, _ in analysed),
        "merge_stats": len(analysed),
        "ablate": len(pairs(config["ablation"]["analyses"])),
        "figure_top_examples": len(config["figures"]["top_examples"]),
        "figure_training": 1,
        "table_statistics": 1,
        "table_ablation": 1,
    }
    assert {rule: counts.get(rule) for rule in expected} == expected
    assert sum(n for rule, n in counts.items() if rule.startswith("figure_")
               and rule not in ("figure_top_examples", "figure_training")) == figures
    assert counts["total"] == sum(n for rule, n in counts.items() if rule != "total")
    assert seconds < 60


def test_the_full_study_estimate_is_computed_from_the_config():
    config = check_config(yaml.safe_load(FULL.read_text()))
    rows = {row["stage"]: row for row in table(config)}
    # the activations of the text models on MNLI: rows x tokens x read-outs x width x 2 bytes
    mnli = 9815 + 9832
    text = sum((blocks + 1) * width for blocks, width in
               ((12, 768), (24, 1024), (12, 768), (24, 1024)) * 2) * mnli * 40 * 2
    assert rows["extract"]["stored_gb"] * 1e9 > text
    assert rows["train"]["gpu_hours"] > rows["ablate"]["gpu_hours"] > 0


def test_the_estimate_of_one_extraction_and_one_training_run():
    from workflow_scripts.estimate import extraction, job_resources, training

    config = check_config(yaml.safe_load(FULL.read_text()))
    # GPT-2 medium on MNLI matched: 9815 pairs x 40 tokens x 25 read-outs x 1024 x 2 bytes
    one = extraction(config, "gpt2-medium", "mnli-matched")
    assert one["bytes"] == 9815 * 40 * 25 * 1024 * 2
    parameters = 12 * 24 * 1024 ** 2 + 50_257 * 1024
    assert one["flops"] == 9815 * 40 * 2 * parameters
    # one epoch of Wikipedia for a 6 x 384 gptr2 with GPT-2's vocabulary: 3 x forward FLOPs
    run = training(config, "gptr2-nano-momentum-decay")
    seen = 6_407_814 * (1 - 0.001) * 700
    assert run["flops"] == pytest.approx(3 * seen * 2 * (12 * 6 * 384 ** 2 + 50_257 * 384))
    small, large = (job_resources(config, "extract", m, "mnli-matched")["mem_mb"]
                    for m in ("gpt2", "gpt2-medium"))
    assert large > small
