"""configs/full.yaml and configs/study.yaml: each whole study's DAG builds offline, in seconds,
with the jobs it should have; the cost estimate follows the formulas."""

from __future__ import annotations

import pytest
import yaml
from support import REPO, offline_dry_run

from workflow_scripts.estimate import table
from workflow_scripts.plan import resolve

FULL = REPO / "configs/full.yaml"
STUDY = REPO / "configs/study.yaml"


def pairs(analyses):
    return {(m, d) for a in analyses for m in a["models"] for d in a["datasets"]}


@pytest.fixture(scope="module", params=[FULL, STUDY], ids=["full", "study"])
def dry_run(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(request.param.stem)
    counts, seconds = offline_dry_run(request.param, workdir)
    return request.param, counts, seconds


@pytest.mark.workflow
def test_the_whole_study_builds_offline_with_the_expected_jobs(dry_run):
    path, counts, seconds = dry_run
    config = yaml.safe_load(path.read_text())
    study = resolve(config)
    trained = snapshots = 0
    for run in config.get("training", {}).get("runs", {}).values():
        combinations = len(run.get("seeds", [0]))
        for axis in run.get("grid", {}).values():
            combinations *= len(axis)
        trained += combinations
        snapshots += combinations * len(run.get("snapshots", []))
    # every (model, dataset) with statistics: the analyses', a run with seeds naming each seed,
    # and the snapshots of the runs of a dynamics figure (the plan's own list)
    analysed = set(study.statistics)
    figures = sum(len(g["figures"]) for g in config["figures"]["groups"].values())
    expected = {
        "fetch_model": len(config["models"]),
        "prepare_data": len(config["datasets"]),
        "train": trained or None,
        "extract": sum(config["datasets"][d].get("shards", 1) for _, d in analysed),
        "layer_stats": sum(study.models[m].readouts for m, _ in analysed),
        "merge_stats": len(analysed),
        "ablate": len(study.ablations),
        "figure_top_examples": len(config["figures"]["top_examples"]),
        "figure_training": 1 if trained else None,
        "table_statistics": 1,
        "table_ablation": 1,
        "snapshot": snapshots or None,
    }
    assert {rule: counts.get(rule) for rule in expected} == expected
    assert (
        sum(
            n
            for rule, n in counts.items()
            if rule.startswith("figure_") and rule not in ("figure_top_examples", "figure_training")
        )
        == figures
    )
    assert counts["total"] == sum(n for rule, n in counts.items() if rule != "total")
    assert seconds < 30 + 0.02 * counts["total"]  # Snakemake's start, then 20 ms a job at most


def test_the_study_config_is_the_study():
    """configs/study.yaml: the study's mode, every text model on both MNLI validation sets, the
    ResNets on ImageNet validation, the author's checkpoints pinned by name."""
    config = yaml.safe_load(STUDY.read_text())
    study = resolve(config)
    assert config["study_compatible"] is True
    text = [name for name, m in study.models.items() if m.family.name != "resnet"]
    assert {(m, d) for m in text for d in ("mnli-matched", "mnli-mismatched")} | {
        (m, "imagenet-val") for m in study.models if m not in text
    } == set(study.statistics)
    for name in text:
        assert study.models[name].extract.padding == "max_length"
        assert study.models[name].extract.max_tokens == 128
    assert study.stats_options.average == "examples"
    assert not study.ablation_options.final_norm and not study.ablation_options.shortcut_relu
    hub = {m.source.location for m in study.models.values() if m.source.scheme == "hf"}
    assert hub == {STUDY_HUB_IDS.get(i, i) for i in STUDY_SCRIPT_MODELS if i not in TORCHVISION}
    assert {
        m.source.location for m in study.models.values() if m.source.scheme == "torchvision"
    } == set(TORCHVISION)
    # Figure 8's four regimes, drawn together
    assert set(study.figure_groups["gptr2-nano-optimizers"].models) == {
        name for name in study.models if name.startswith("gptr2-nano-")
    }
    assert len(study.figure_groups["gptr2-nano-optimizers"].models) == 4


# every model the study's scripts run (github.com/George-Ogden/residual-streams, scripts/run-text.sh
# and scripts/run-image.sh), as its scripts name them
STUDY_SCRIPT_MODELS = (
    "roberta-base",
    "roberta-large",
    "gpt2",
    "gpt2-medium",
    "George-Ogden/roberta-large-cased-finetuned-mnli",
    "George-Ogden/roberta-base-cased-finetuned-mnli",
    "George-Ogden/gpt2-finetuned-mnli",
    "George-Ogden/gpt2-medium-finetuned-mnli",
    "George-Ogden/gptr2-nano-without-momentum-with-weight-decay",
    "George-Ogden/gptr2-nano-with-momentum-with-weight-decay",
    "George-Ogden/gptr2-nano-without-momentum-without-weight-decay",
    "George-Ogden/gptr2-nano-with-momentum-without-weight-decay",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
)
TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# the hub's canonical ids of the scripts' short ones (the short ones redirect to them)
STUDY_HUB_IDS = {
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
}


def test_the_full_study_estimate_is_computed_from_the_config():
    rows = {row["stage"]: row for row in table(resolve(yaml.safe_load(FULL.read_text())))}
    # the activations of the text models on MNLI: rows x tokens x read-outs x width x 2 bytes
    mnli = 9815 + 9832
    text = (
        sum(
            (blocks + 1) * width
            for blocks, width in ((12, 768), (24, 1024), (12, 768), (24, 1024)) * 2
        )
        * mnli
        * 40
        * 2
    )
    assert rows["extract"]["stored_gb"] * 1e9 > text
    assert rows["train"]["gpu_hours"] > rows["ablate"]["gpu_hours"] > 0


def test_the_estimate_of_one_extraction_and_one_training_run():
    from workflow_scripts.estimate import extraction, job_resources, training

    config = resolve(yaml.safe_load(FULL.read_text()))
    # GPT-2 medium on MNLI matched: 9815 pairs x 40 tokens x 25 read-outs x 1024 x 2 bytes
    one = extraction(config, "gpt2-medium", "mnli-matched")
    assert one["bytes"] == 9815 * 40 * 25 * 1024 * 2
    parameters = 12 * 24 * 1024**2 + 50_257 * 1024
    assert one["flops"] == 9815 * 40 * 2 * parameters
    # one epoch of Wikipedia for a 6 x 384 gptr2 with GPT-2's vocabulary: 3 x forward FLOPs
    run = training(config, "gptr2-nano-momentum-decay")
    seen = 6_407_814 * (1 - 0.001) * 700
    assert run["flops"] == pytest.approx(3 * seen * 2 * (12 * 6 * 384**2 + 50_257 * 384))
    small, large = (
        job_resources(config, "extract", m, "mnli-matched")["mem_mb"]
        for m in ("gpt2", "gpt2-medium")
    )
    assert large > small


@pytest.mark.parametrize("stage", ["extract", "ablate"])
def test_job_memory_counts_the_model_in_its_dtype(stage):
    """A 7B-shape decoder: its weights at 4 bytes in float32, 2 in bfloat16 (and auto); the
    stored stream at the storage dtype's bytes."""
    from workflow_scripts.estimate import extraction, job_resources

    config = yaml.safe_load(FULL.read_text())
    config["models"]["big"] = {
        "family": "decoder",
        "source": "hf:someone/big",
        "blocks": 32,
        "width": 4096,
    }
    config["analyses"].append({"models": ["big"], "datasets": ["mnli-matched"]})
    memory = {}
    for dtype in ("float32", "bfloat16", "auto"):
        config["models"]["big"]["dtype"] = dtype
        memory[dtype] = job_resources(resolve(config), stage, "big", "mnli-matched")["mem_mb"]
    big = resolve(config).models["big"]
    saved = 2 * big.size.parameters * (2 if stage == "ablate" else 1)  # 2 bytes a parameter
    if stage == "extract":  # and 2 bytes a value of the batches on their way to the writer
        tokens = big.extract.batch_size * big.extract.max_tokens
        saved += 2 * 3 * tokens * big.size.readouts * big.size.width
    assert memory["float32"] - memory["bfloat16"] == pytest.approx(1.5 * saved / 2**20, abs=1)
    assert memory["auto"] == memory["bfloat16"]
    stored = {}
    for dtype in ("float16", "bfloat16", "float32"):
        config["extract"] = {"dtype": dtype}
        stored[dtype] = extraction(resolve(config), "big", "mnli-matched")["bytes"]
    assert stored["float16"] == stored["bfloat16"] == stored["float32"] / 2
