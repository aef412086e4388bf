# Input functions and helpers shared by the rules.
import json
from pathlib import Path

from workflow_scripts.code import module_sources
import re

from workflow_scripts.config import analysis_pairs, extract_options, thresholds, trained_models
from workflow_scripts.estimate import job_resources
from workflow_scripts.sources import FAMILY_MODULES, readout_count, source_scheme


wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    dataset=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    shard=r"\d+",
    layer=r"\d+",


def job_resource(stage, key):
    """A resource of a model's job (mem_mb, runtime in minutes) that scales with the model and
    the data, computed from the config (workflow_scripts/estimate.py)."""

    def value(wildcards):
        dataset = wildcards.get("dataset")
        return job_resources(config, stage, wildcards.model, dataset)[key]

    return value


def names_pattern(names):
    """A wildcard pattern matching exactly these names (nothing, when there are none)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def training_run(model):
    return config["training"]["runs"][source_scheme(config["models"][model]["source"])[1]]


def run_model_dir(model, key):
    """The directory of the model that a run names under ``key`` (base: the model a fine-tune
    starts from; tokenizer: the model whose tokenizer a language model uses), if any."""
    name = training_run(model).get(key)
    return [f"results/models/{name}"] if name else []


def code_files(module):
    """The package files a stage's entry module runs: declared as inputs of its rule."""
    return module_sources(module)


def model_code_files(module):
    """An input function: the files of a stage that runs a model, with its family's module
    (and not the other families')."""

    def files(wildcards):
        return module_sources(module, FAMILY_MODULES[config["models"][wildcards.model]["family"]])

    return files


def model_spec(wildcards):
    """A model's config entry, as JSON: everything fetch_model uses comes in through params.
    Only what fetching uses: a threshold or an extraction option must not refetch."""
    fetched = ("family", "source", "arch", "seed", "head", "num_labels")
    spec = {k: v for k, v in config["models"][wildcards.model].items() if k in fetched}
    return json.dumps(spec, sort_keys=True)


def local_model_files(wildcards):
    """A local: model's files, so a change to them refetches it."""
    scheme, path = source_scheme(config["models"][wildcards.model]["source"])
    if scheme != "local":
        return []
    return sorted(str(p) for p in Path(path).rglob("*") if p.is_file())


def dataset_spec(wildcards):
    spec = dict(config["datasets"][wildcards.dataset])
    for key in ("shards", "expected_rows", "expected_tokens"):  # not the data's business
        spec.pop(key, None)
    return json.dumps(spec, sort_keys=True)


def dataset_source_files(wildcards):
    """A parquet: or imagefolder: dataset's files, so a change to them reprepares it."""
    scheme, path = source_scheme(config["datasets"][wildcards.dataset]["source"])
    if scheme == "parquet":
        return [path]
    if scheme == "imagefolder":
        return sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
    return []


def extraction_options(wildcards):
    return json.dumps(extract_options(config, wildcards.model), sort_keys=True)


def shard_count(dataset):
    return config["datasets"][dataset]["shards"]


def activation_shards(model, dataset):
    return expand(
        "results/activations/{model}/{dataset}/shard-{shard}.zarr",
        model=model,
        dataset=dataset,
        shard=range(shard_count(dataset)),
    )


def stats_options():
    """The stats options that change the numbers (thresholds come per model)."""
    return {k: v for k, v in config["stats"].items() if k != "thresholds"}


def layer_stats_files(model, dataset):
    return expand(
        "results/stats/{model}/{dataset}/layer-{layer}.parquet",
        model=model,
        dataset=dataset,
        layer=range(readout_count(config["models"][model])),
    )


def all_stats():
    return [
        f"results/stats/{model}/{dataset}.parquet"
        for model, dataset in analysis_pairs(config)
    ]


def ablation_options():
    return {k: v for k, v in config["ablation"].items() if k != "analyses"}


def all_ablations():
    return [
        f"results/ablation/{model}/{dataset}.parquet"
        for model, dataset in analysis_pairs(config, config["ablation"]["analyses"])
    ]


def all_figures():
    figures = [
        f"results/figures/{figure}-{group}.{ext}"
        for group, spec in config["figures"]["groups"].items()
        for figure in spec["figures"]
        for ext in ("png", "pdf")
    ]
    for spec in config["figures"]["top_examples"]:
        figures += expand(
            "results/figures/top-examples-{model}-{dataset}-layer{layer}.{ext}",
            ext=("png", "pdf"), **{k: spec[k] for k in ("model", "dataset", "layer")},
        )
    figures += ["results/tables/statistics.csv"]
    if config["ablation"]["analyses"]:
        figures += ["results/tables/ablation.csv"]
    if config["figures"]["training"] and config["training"]["runs"]:
        figures += ["results/figures/training.png", "results/figures/training.pdf"]
    return figures


def stats_inputs(wildcards):
    group = config["figures"]["groups"][wildcards.group]
    return [f"results/stats/{m}/{d}.parquet" for m in group["models"] for d in group["datasets"]]


def ablation_inputs(wildcards):
    group = config["figures"]["groups"][wildcards.group]
    return [f"results/ablation/{m}/{d}.parquet" for m in group["models"] for d in group["datasets"]]


def top_examples_options(wildcards):
    """The settings of a top-examples figure, as JSON."""
    for spec in config["figures"]["top_examples"]:
        if (spec["model"], spec["dataset"], spec["layer"]) == (
            wildcards.model, wildcards.dataset, int(wildcards.layer)
        ):
            break
    else:
        raise ValueError(f"no figures.top_examples entry for {dict(wildcards)}")
    return json.dumps(
        {
            **spec,
            "include_padding": config["stats"]["include_padding"],
            "dpi": config["figures"]["dpi"],
            "max_tokens": extract_options(config, wildcards.model)["max_tokens"],
        },
        sort_keys=True,
    )
