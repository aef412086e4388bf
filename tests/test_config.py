"""Config validation: every problem stops the run with one message naming key, value and what is
allowed."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO
from workflow_scripts.config import ConfigError, analysis_pairs, check_config, extract_options


def test_default_config_is_valid_and_gets_defaults(default_config):
    config = check_config(default_config)
    assert config["extract"]["chunk_rows"] == 1024
    assert config["extract"]["gpt2_final_readout"] == "raw"
    assert config["datasets"]["pairs"]["seed"] == 0
    assert ("resnet-init", "shapes") in analysis_pairs(config)
    assert ("resnet-init", "pairs") not in analysis_pairs(config)


def test_model_extract_options_override_the_global_ones(default_config):
    default_config["models"]["gpt2-init"]["extract"] = {"dtype": "float32"}
    config = check_config(default_config)
    assert extract_options(config, "gpt2-init")["dtype"] == "float32"
    assert extract_options(config, "roberta-init")["dtype"] == "float16"


def error_for(config) -> str:
    with pytest.raises(ConfigError) as caught:
        check_config(config)
    return str(caught.value)


def test_misspelled_key(default_config):
    spec = default_config["models"]["gpt2-init"]
    spec["famliy"] = spec.pop("family")
    message = error_for(default_config)
    assert "models.gpt2-init" in message and "'famliy'" in message
    assert "family" in message and "source" in message  # the allowed keys


def test_misspelled_top_level_key(default_config):
    default_config["extarct"] = default_config.pop("extract")
    message = error_for(default_config)
    assert "'extarct'" in message and "extract" in message.split("allowed keys:")[1]


def test_wrong_type(default_config):
    default_config["datasets"]["pairs"]["rows"] = "many"
    message = error_for(default_config)
    assert "datasets.pairs.rows" in message and "'many'" in message and "integer" in message


def test_unknown_family(default_config):
    default_config["models"]["gpt2-init"]["family"] = "gpt3"
    message = error_for(default_config)
    assert "models.gpt2-init.family" in message and "'gpt3'" in message
    assert "gpt2, gptr2, roberta, bert, resnet" in message


def test_unknown_model_source_scheme(default_config):
    default_config["models"]["gpt2-init"]["source"] = "s3:bucket/model"
    message = error_for(default_config)
    assert "models.gpt2-init.source" in message and "'s3:bucket/model'" in message
    assert "hf:<repo>" in message and "torchvision:<arch>" in message and "init:" in message


def test_unknown_dataset_source_scheme(default_config):
    default_config["datasets"]["pairs"]["source"] = "builtin:mnist"
    message = error_for(default_config)
    assert "datasets.pairs.source" in message and "'builtin:mnist'" in message
    assert "builtin:<pairs|corpus|shapes>" in message


def test_model_referenced_but_not_defined(default_config):
    default_config["analyses"][0]["models"].append("gpt2-large")
    message = error_for(default_config)
    assert "analyses.0.models" in message and "'gpt2-large'" in message
    assert "gpt2-init" in message  # the defined ones


def test_dataset_referenced_but_not_defined(default_config):
    default_config["analyses"][1]["datasets"] = ["imagenet"]
    message = error_for(default_config)
    assert "analyses.1.datasets" in message and "'imagenet'" in message and "shapes" in message


def test_text_model_on_images(default_config):
    default_config["analyses"][0]["datasets"].append("shapes")
    message = error_for(default_config)
    assert "gpt2-init" in message and "shapes" in message and "image" in message


def test_init_model_without_arch(default_config):
    del default_config["models"]["roberta-init"]["arch"]
    assert "models.roberta-init" in error_for(default_config)


def test_resnet_arch_needs_a_width_per_stage(default_config):
    default_config["models"]["resnet-init"]["arch"]["widths"] = [16, 32]
    message = error_for(default_config)
    assert "models.resnet-init.arch.widths" in message and "one width per stage (4)" in message


def test_more_shards_than_rows(default_config):
    default_config["datasets"]["corpus"]["rows"] = 3
    default_config["datasets"]["corpus"]["shards"] = 4
    message = error_for(default_config)
    assert "datasets.corpus.shards" in message and "4 shards for 3 rows" in message


def test_missing_local_path(default_config, tmp_path):
    default_config["models"]["gpt2-init"] = {"family": "gpt2", "blocks": 2,
                                             "source": f"local:{tmp_path}/nothing"}
    message = error_for(default_config)
    assert "models.gpt2-init.source" in message and "nothing" in message


def test_torchvision_source_must_be_a_resnet(default_config):
    default_config["models"]["gpt2-init"] = {"family": "gpt2", "source": "torchvision:resnet18"}
    assert "family: resnet" in error_for(default_config)


def test_hub_dataset_needs_a_kind(default_config):
    default_config["datasets"]["pairs"] = {"source": "hf:nyu-mll/glue/mnli:validation_matched"}
    message = error_for(default_config)
    assert "datasets.pairs" in message and "'kind'" in message


def test_snakemake_stops_before_any_job(tmp_path, default_config):
    default_config["models"]["gpt2-init"]["family"] = "gpt3"
    bad = tmp_path / "config.yaml"
    bad.write_text(yaml.safe_dump(default_config))
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile",
                          str(REPO / "Snakefile"), "--directory", str(tmp_path),
                          "--configfile", str(bad)], capture_output=True, text=True)
    assert run.returncode != 0
    assert "config error at models.gpt2-init.family: 'gpt3' is not allowed" in run.stderr + run.stdout
    assert not (tmp_path / "results").exists()
    assert time.monotonic() - start < 30


def test_hub_and_local_models_need_their_block_count(default_config):
    default_config["models"]["gpt2-init"] = {"family": "gpt2", "source": "hf:openai-community/gpt2"}
    message = error_for(default_config)
    assert "models.gpt2-init" in message and "'blocks'" in message


def test_unknown_torchvision_resnet(default_config):
    default_config["models"]["resnet-init"] = {"family": "resnet", "source": "torchvision:resnet19"}
    message = error_for(default_config)
    assert "'resnet19'" in message and "resnet18" in message


def test_read_out_counts_come_from_the_config_alone():
    from workflow_scripts.sources import readout_count
    assert readout_count({"family": "gpt2", "source": "init:", "arch": {"layers": 4}}) == 5
    assert readout_count({"family": "resnet", "source": "init:", "arch": {"layers": [2, 3]}}) == 5
    assert readout_count({"family": "resnet", "source": "torchvision:resnet50"}) == 16
    assert readout_count({"family": "resnet", "source": "torchvision:resnet152"}) == 50
    assert readout_count({"family": "roberta", "source": "hf:FacebookAI/roberta-base", "blocks": 12}) == 13


def test_thresholds_per_family_and_per_model(default_config):
    from workflow_scripts.config import thresholds
    default_config["stats"] = {"thresholds": {"gpt2": [5, 10]}}
    default_config["models"]["roberta-init"]["thresholds"] = 2.5
    config = check_config(default_config)
    assert thresholds(config, "gpt2-init") == [5.0, 10.0]
    assert thresholds(config, "gptr2-init") == [10.0]  # the family default is kept
    assert thresholds(config, "roberta-init") == [2.5]
    assert thresholds(config, "resnet-init") == [6.0]


def test_token_lengths_beyond_a_models_context(default_config):
    default_config["models"]["gpt2-init"]["arch"]["context"] = 32
    message = error_for(default_config)
    assert "extract.max_tokens" in message and "'gpt2-init' takes at most 32" in message
