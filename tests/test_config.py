"""Config validation and the study's plan: every problem stops the run with one message naming
key, value and what is allowed; a valid config resolves into an immutable plan and stays as the
user wrote it."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import time

import pytest
import yaml
from support import REPO, environment

from workflow_scripts.config import STUDY_SETTINGS, ConfigError, validate
from workflow_scripts.plan import resolve
from workflow_scripts.sources import Source


def test_default_config_resolves_with_defaults(default_config):
    study = resolve(default_config)
    assert study.models["gpt2-init"].extract.chunk_rows == 1024
    assert study.models["gpt2-init"].extract.gpt2_final_readout == "raw"
    assert study.datasets["pairs"].entry["seed"] == 0
    assert ("resnet-init", "shapes") in study.statistics
    assert ("resnet-init", "pairs") not in study.statistics
    entry = study.top_examples[0]
    assert (entry.figure.top, entry.figure.examples) == (4, 6)  # the schema's defaults
    assert (entry.page.examples, entry.page.thumbnail) == (8, 48)  # the page's defaults


def test_validation_and_resolution_leave_the_config_as_written(default_config):
    written = copy.deepcopy(default_config)
    validate(default_config)
    study = resolve(default_config)
    assert default_config == written
    assert "gptr2-nano-sgd" in study.models and "gptr2-nano-sgd" not in default_config["models"]


def test_the_plan_is_immutable(default_config):
    study = resolve(default_config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        study.dpi = 300
    with pytest.raises(TypeError):
        study.models["extra"] = study.models["gpt2-init"]
    with pytest.raises(TypeError):
        study.runs["gptr2-nano-sgd"].settings["optimizer"]["lr"] = 1.0


def test_grid_runs_are_models_with_their_settings(default_config):
    study = resolve(default_config)
    sgd = study.runs["gptr2-nano-sgd"]
    assert sgd.settings["optimizer"] == {"name": "sgd", "lr": 0.3, "momentum": 0.9}
    assert sgd.settings["batch_size"] == 16 and sgd.settings["seed"] == 0  # given, default
    model = study.models["gptr2-nano-sgd"]
    assert model.run == "gptr2-nano-sgd" and model.family.name == "gptr2"
    assert model.head == "causal_lm" and model.readouts == 5
    assert study.models["roberta-pairs"].readouts == 5  # a fine-tune: its base's
    assert study.run_of("roberta-pairs").base == "roberta-init"
    assert set(study.trained_models()) == set(study.runs)


def test_model_extract_options_override_the_global_ones(default_config):
    default_config["models"]["gpt2-init"]["extract"] = {"dtype": "float32"}
    study = resolve(default_config)
    assert study.models["gpt2-init"].extract.dtype == "float32"
    assert study.models["roberta-init"].extract.dtype == "float16"


def test_study_compatible_sets_the_studys_defaults_under_the_configs_own_keys(default_config):
    del default_config["extract"]
    corrected = resolve(default_config)
    study = resolve({**default_config, "study_compatible": True})
    for model in ("gpt2-init", "roberta-init"):
        assert corrected.models[model].extract.padding == "longest"
        assert {k: getattr(study.models[model].extract, k) for k in STUDY_SETTINGS["extract"]} == (
            STUDY_SETTINGS["extract"]
        )
    assert corrected.stats_options.average == "rows"
    assert study.stats_options == dataclasses.replace(
        corrected.stats_options,
        **{k: v for k, v in STUDY_SETTINGS["stats"].items() if k != "thresholds"},
    )
    assert study.ablation_options == dataclasses.replace(
        corrected.ablation_options, **STUDY_SETTINGS["ablation"]
    )
    assert study.models["gptr2-init"].thresholds == (6.0,)  # the study's script's, not GPT-2's
    assert corrected.models["gptr2-init"].thresholds == (10.0,)
    # a key the config sets wins, in its section and in a model's own extract options
    default_config["extract"] = {"max_tokens": 64}
    default_config["stats"] = {"average": "rows", "thresholds": {"gpt2": 12}}
    default_config["models"]["roberta-init"]["extract"] = {"padding": "longest"}
    study = resolve({**default_config, "study_compatible": True})
    assert study.models["gpt2-init"].extract.max_tokens == 64
    assert study.models["gpt2-init"].extract.padding == "max_length"
    assert study.models["roberta-init"].extract.padding == "longest"
    assert study.stats_options.average == "rows"
    assert study.stats_options.rms == "root_mean_square"
    assert study.models["gpt2-init"].thresholds == (12.0,)
    assert study.models["resnet-init"].thresholds == (6.0,)


def test_ablating_a_model_without_a_declared_head_says_the_head_is_assumed(default_config):
    default_config["models"]["gpt2-hub"] = {
        "family": "gpt2",
        "source": "hf:openai-community/gpt2",
        "blocks": 12,
    }
    default_config["ablation"]["analyses"].append({"models": ["gpt2-hub"], "datasets": ["pairs"]})
    message = error_for(default_config)
    assert "declares no head, so family gpt2's default 'causal_lm' is assumed" in message
    default_config["models"]["gpt2-hub"]["head"] = "causal_lm"
    assert "is declared with head 'causal_lm'" in error_for(default_config)


def error_for(config) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(config)
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
    assert "known: bert, decoder, gpt2, gptr2, resnet, roberta" in message


def test_a_source_is_parsed_once_into_its_scheme_and_location(default_config):
    source = Source.parse("hf:George-Ogden/gpt2-finetuned-mnli@main")
    assert (source.scheme, source.location) == ("hf", "George-Ogden/gpt2-finetuned-mnli@main")
    assert str(source) == "hf:George-Ogden/gpt2-finetuned-mnli@main"
    assert Source.parse("train:nano").run == "nano" and Source.parse("init:").run is None
    assert Source.parse("builtin:shapes").holds == "image"
    assert Source.parse("parquet:rows.parquet").holds is None  # its kind key says
    study = resolve(default_config)
    assert study.models["gpt2-init"].source == Source("init", "")
    assert study.datasets["shapes"].source == Source("builtin", "shapes")


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
    default_config["models"]["gpt2-init"] = {
        "family": "gpt2",
        "blocks": 2,
        "source": f"local:{tmp_path}/nothing",
    }
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
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(bad),
        ],
        capture_output=True,
        text=True,
        env=environment(),
    )
    assert run.returncode != 0
    assert "config error at models.gpt2-init.family: unknown model family 'gpt3'" in (
        run.stderr + run.stdout
    )
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


def test_read_out_counts_come_from_the_config_alone(default_config):
    default_config["models"].update(
        gpt2={"family": "gpt2", "source": "init:", "arch": {"layers": 4, "width": 8, "heads": 2}},
        staged={
            "family": "resnet",
            "source": "init:",
            "arch": {"layers": [2, 3], "widths": [4, 8]},
        },
        resnet50={"family": "resnet", "source": "torchvision:resnet50"},
        resnet152={"family": "resnet", "source": "torchvision:resnet152"},
        roberta={"family": "roberta", "source": "hf:FacebookAI/roberta-base", "blocks": 12},
    )
    study = resolve(default_config)
    counts = {
        name: study.models[name].readouts
        for name in ("gpt2", "staged", "resnet50", "resnet152", "roberta")
    }
    assert counts == {"gpt2": 5, "staged": 5, "resnet50": 16, "resnet152": 50, "roberta": 13}


def test_thresholds_per_family_and_per_model(default_config):
    default_config["stats"] = {"thresholds": {"gpt2": [5, 10]}}
    default_config["models"]["roberta-init"]["thresholds"] = 2.5
    models = resolve(default_config).models
    assert models["gpt2-init"].thresholds == (5.0, 10.0)
    assert models["gptr2-init"].thresholds == (10.0,)  # the family default is kept
    assert models["roberta-init"].thresholds == (2.5,)
    assert models["resnet-init"].thresholds == (6.0,)


def test_thresholds_of_an_unknown_family(default_config):
    default_config["stats"] = {"thresholds": {"gpt3": 5}}
    assert "stats.thresholds.gpt3: unknown model family 'gpt3'" in error_for(default_config)


def test_a_head_the_family_does_not_have(default_config):
    default_config["models"]["gpt2-init"]["head"] = "image_classification"
    message = error_for(default_config)
    assert "models.gpt2-init.head" in message and "causal_lm, sequence_classification" in message


def test_token_lengths_beyond_a_models_context(default_config):
    default_config["models"]["gpt2-init"]["arch"]["context"] = 32
    message = error_for(default_config)
    assert "extract.max_tokens" in message and "'gpt2-init' takes at most 32" in message


def test_an_architecture_in_fractions_is_refused(default_config):
    default_config["models"]["gpt2-init"]["arch"]["width"] = 64.0
    with pytest.raises(
        ConfigError, match=r"models.gpt2-init.arch.width: 64.0; needs whole numbers"
    ):
        validate(default_config)
    default_config["models"]["gpt2-init"]["arch"]["width"] = 64
    default_config["models"]["resnet-init"]["arch"]["widths"] = [16, 32.5, 64, 128]
    with pytest.raises(ConfigError, match=r"resnet-init.arch.widths.1: 32.5 .*integer"):
        validate(default_config)


@pytest.mark.parametrize("where", ["stats", "model"])
def test_a_threshold_that_is_not_a_number_is_refused(default_config, where):
    if where == "stats":
        default_config.setdefault("stats", {})["thresholds"] = {"gpt2": [10, float("nan")]}
        place = "stats.thresholds.gpt2"
    else:
        default_config["models"]["gpt2-init"]["thresholds"] = float("inf")
        place = "models.gpt2-init.thresholds"
    with pytest.raises(ConfigError, match=rf"{place}: .*thresholds must be finite numbers"):
        validate(default_config)


def test_config_on_the_command_line_changes_nested_settings_of_the_default():
    """`--config 'extract={batch_size: 8}'` changes that setting of config.yaml and keeps the
    rest; Snakemake hands nested values over as strings (parsed here by its own command line
    parser)."""
    from snakemake.cli import parse_config
    from support import REPO

    from workflow_scripts.config import with_overrides
    from workflow_scripts.plan import resolve

    default = yaml.safe_load((REPO / "config.yaml").read_text())
    given = parse_config(
        ["extract={batch_size: 8, autocast: null}", "stats={include_padding: true}"]
    )
    assert given["extract"] == {"batch_size": "8", "autocast": "null"}  # strings, as given
    study = resolve(with_overrides(default, given))
    options = study.models["gpt2-init"].extract
    assert options.batch_size == 8 and options.autocast is None
    assert options.max_tokens == 128  # config.yaml's, kept
    assert study.stats_options.include_padding is True


def test_nested_command_line_values_are_typed():
    from workflow_scripts.config import with_overrides

    merged = with_overrides(
        {"extract": {"batch_size": 32, "dtype": "float16"}, "models": {"a": {}}},
        {
            "extract": {"batch_size": "8", "device": "cpu", "rows_per_example": "null"},
            "other": {"a": "0x10", "b": "yes", "c": "1:2", "d": "1e-3", "e": "*x", "f": "True"},
        },
    )
    assert merged["extract"] == {
        "batch_size": 8,
        "dtype": "float16",
        "device": "cpu",
        "rows_per_example": None,
    }
    # YAML 1.2's core scalars only; anything else stays the string it was
    assert merged["other"] == {"a": "0x10", "b": "yes", "c": "1:2", "d": 1e-3, "e": "*x", "f": True}
    assert merged["models"] == {"a": {}}


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    from workflow_scripts.config import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  a: {family: gpt2\n  b: 3\n")
    good = tmp_path / "good.yaml"
    good.write_text((REPO / "config.yaml").read_text())
    with pytest.raises(SystemExit) as exit:
        main([str(good), str(bad)])
    assert exit.value.code == 1
    out, err = capsys.readouterr()
    assert f"{good}: valid" in out
    assert f"{bad}, line 3, column" in err and "not valid YAML" in err


def test_the_default_config_is_used_unless_a_config_file_is_given(tmp_path, monkeypatch):
    """What the Snakefile does with Snakemake's `config`: --config values alone are merged over
    config.yaml; a config with models came from --configfile and stands alone."""
    from workflow_scripts.config import with_defaults

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no config: config.yaml is not in the working"):
        with_defaults({"extract": {"batch_size": "8"}})
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    merged = with_defaults({"extract": {"batch_size": "8"}})
    assert merged["extract"]["batch_size"] == 8 and "gpt2-init" in merged["models"]
    given = {"models": {"m": {"family": "gpt2", "source": "init:"}}, "extract": {"seed": "3"}}
    assert with_defaults(given) == {**given, "extract": {"seed": 3}}


def test_figures_whose_names_run_together_are_refused(default_config):
    """Names may hold '-', which also joins them in a figure's file name: model `a-b` on dataset
    `c` and model `a` on dataset `b-c` would both write top-examples-a-b-c-layer1.*."""
    config = copy.deepcopy(default_config)
    models, datasets = config["models"], config["datasets"]
    models["gpt2-init-x"] = copy.deepcopy(models["gpt2-init"])
    datasets["x-corpus"] = copy.deepcopy(datasets["corpus"])
    datasets["corpus-x"] = copy.deepcopy(datasets["corpus"])
    config["analyses"].append(
        {"models": ["gpt2-init", "gpt2-init-x"], "datasets": ["corpus", "x-corpus", "corpus-x"]}
    )
    config["figures"]["top_examples"] = [
        {"model": "gpt2-init-x", "dataset": "corpus", "layer": 1},
        {"model": "gpt2-init", "dataset": "x-corpus", "layer": 1},
    ]
    with pytest.raises(
        ConfigError,
        match=r"figures.top_examples.1 .*writes results/figures/top-examples-gpt2-init-x-corpus-"
        r"layer1.\*, as figures.top_examples.0 \(model 'gpt2-init-x', dataset 'corpus'",
    ):
        resolve(config)
    config["figures"]["top_examples"][1]["dataset"] = "corpus-x"
    resolve(config)


@pytest.mark.parametrize("value", [0, -2.5, [4, 0]])
def test_a_threshold_of_zero_or_below_is_refused(default_config, value):
    default_config["models"]["gpt2-init"]["thresholds"] = value
    with pytest.raises(ConfigError, match=r"models.gpt2-init.thresholds: .*must be above 0"):
        validate(default_config)


def test_sizes_no_run_could_finish_are_refused(default_config):
    config = copy.deepcopy(default_config)
    config["datasets"]["corpus"]["rows"] = 10**12
    with pytest.raises(
        ConfigError, match=r"datasets.corpus.rows: 1000000000000 rows of a built-in"
    ):
        validate(config)
    config = copy.deepcopy(default_config)
    config["datasets"]["corpus"]["shards"] = 1_000_000
    with pytest.raises(ConfigError, match=r"datasets.corpus.shards: .*10000"):
        validate(config)


@pytest.mark.parametrize(
    "target", ["results/stats/nomodel/corpus.parquet", "results/data/nodataset.parquet"]
)
def test_a_target_naming_what_the_config_lacks_is_no_rule_not_a_traceback(tmp_path, target):
    import subprocess
    import sys

    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"), target],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert f"No rule to produce {target}" in done.stderr + done.stdout
    assert "KeyError" not in done.stderr + done.stdout


def test_a_missing_parquet_source_does_not_stop_a_dry_run(tmp_path):
    """Its prepare_data job names it when it runs; the rest of the DAG is there to see."""
    import subprocess
    import sys

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["datasets"]["corpus"] = {"source": "parquet:/nowhere/corpus.parquet", "kind": "text"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile")],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prepare_data" in done.stdout + done.stderr
