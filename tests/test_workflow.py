"""The workflow end to end: a real Snakemake run of a tiny config in a temporary folder."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml
from support import REPO, environment, job_counts, load_config, snakemake

from workflow_scripts.activations import open_shard

TINY_CONFIG = load_config("tiny")
pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def test_every_model_and_dataset_is_extracted(finished_run):
    expected = {
        ("gpt2-tiny", "pairs", 2),
        ("roberta-tiny", "pairs", 2),
        ("resnet-tiny", "shapes", 1),
    }
    for model, dataset, shards in expected:
        ids = []
        for shard in range(shards):
            group = open_shard(
                finished_run / f"results/activations/{model}/{dataset}/shard-{shard}.zarr"
            )
            ids.append(np.unique(group["example_id"][:]))
        rows = TINY_CONFIG["datasets"][dataset]["rows"]
        assert np.concatenate(ids).tolist() == list(range(rows))
    assert sorted(p.name for p in (finished_run / "results/models").iterdir()) == [
        "gpt2-tiny",
        "resnet-tiny",
        "roberta-tiny",
    ]


def test_statistics_for_every_model_and_dataset(finished_run):
    import pandas as pd

    for model, dataset, layers in (
        ("gpt2-tiny", "pairs", 3),
        ("roberta-tiny", "pairs", 3),
        ("resnet-tiny", "shapes", 3),
    ):
        frame = pd.read_parquet(finished_run / f"results/stats/{model}/{dataset}.parquet")
        assert sorted(frame["layer"].unique()) == list(range(layers))
        assert (frame["model"] == model).all() and (frame["dataset"] == dataset).all()
        kurtosis = frame[frame["metric"] == "kurtosis"]
        assert len(kurtosis) == layers and kurtosis["value"].between(1, 1000).all()
        threshold = {"gpt2-tiny": "10", "roberta-tiny": "4", "resnet-tiny": "6"}[model]
        assert f"signed x > {threshold}" in set(frame["setting"])


def test_ablation_for_every_ablation_pair(finished_run):
    import pandas as pd

    frame = pd.read_parquet(finished_run / "results/ablation/resnet-tiny/shapes.parquet")
    assert set(frame["direction"]) == {"head", "tail"} and set(frame["metric"]) == {"top1", "top5"}
    assert (frame["examples"] == 12).all()
    frame = pd.read_parquet(finished_run / "results/ablation/roberta-tiny/pairs.parquet")
    assert sorted(frame["layer"].unique()) == [0, 1, 2]
    assert not (finished_run / "results/ablation/gpt2-tiny").exists()


def test_every_job_writes_its_log(finished_run):
    logs = finished_run / "results/logs"
    assert (logs / "fetch_model/gpt2-tiny.log").read_text().strip()
    assert (logs / "prepare_data/pairs.log").read_text().strip()
    extract_log = (logs / "extract/roberta-tiny/pairs/shard-1.log").read_text()
    assert "extract shard 1: 100%" in extract_log  # the progress bar goes to the log


def test_a_second_run_has_nothing_to_do(finished_run):
    result = snakemake(finished_run, "-n")
    assert result.returncode == 0
    assert job_counts(result.stdout + result.stderr) == {}


def test_a_single_target_builds_only_what_it_needs(finished_run, tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    result = snakemake(tmp_path, "-n", "results/activations/resnet-tiny/shapes/shard-0.zarr")
    assert result.returncode == 0, result.stderr
    jobs = result.stdout + result.stderr
    assert "fetch_model" in jobs and "extract" in jobs
    assert job_counts(result.stdout + result.stderr) == {
        "fetch_model": 1,
        "prepare_data": 1,
        "extract": 1,
        "total": 3,
    }


def test_lint_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr, result.stdout


def test_an_extraction_option_of_one_model_reruns_only_that_model_from_extraction_on(finished_run):
    changed = load_config("tiny")
    changed["models"]["gpt2-tiny"]["extract"] = {"dtype": "float32"}
    config = finished_run / "changed.yaml"
    config.write_text(yaml.safe_dump(changed))
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(finished_run),
        "--configfile",
        str(config),
        "-n",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment())
    assert result.returncode == 0, result.stderr
    assert job_counts(result.stdout + result.stderr) == {
        "extract": 2,
        "layer_stats": 3,
        "merge_stats": 1,
        "table_statistics": 1,
        "all": 1,
        "total": 8,
    }
    assert "gpt2-tiny/pairs/shard-0.zarr" in result.stdout + result.stderr


def test_figures_and_the_report(finished_run):
    for name in ("kurtosis-resnets", "ablation-resnets"):
        assert (finished_run / f"results/figures/{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (finished_run / f"results/figures/{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (finished_run / "results/figures/training.png").exists()  # no runs here
    result = snakemake(finished_run, "--report", "results/report.html")
    assert result.returncode == 0, result.stderr[-3000:]
    html = (finished_run / "results/report.html").read_text(errors="replace")
    assert "kurtosis-resnets.png" in html and "ablation-resnets.png" in html
    # a caption's line breaks: whitespace, or "\n" in the report's embedded JSON
    text = " ".join(html.replace("\\n", " ").split())
    assert "Ablating a block removes its residual branch" in text  # a caption
    assert "statistics.csv" in html and "ablation.csv" in html  # the tables
    assert "resnet-tiny (resnet, " in html and "averaged over rows" in html  # the front page
    assert "{'models'" not in html
    import pandas as pd

    table = pd.read_csv(finished_run / "results/tables/statistics.csv")
    assert set(table["model"]) == {"gpt2-tiny", "roberta-tiny", "resnet-tiny"}
