# Input and param functions shared by the rules. They read `study`, the resolved plan of the
# config (workflow_scripts/plan.py); no rule body holds logic of its own.
import re
from pathlib import Path

from workflow_scripts.estimate import job_resources
from workflow_scripts.figure_registry import FIGURES
from workflow_scripts.optimizers import basis_seed
from workflow_scripts.plan import as_json
from workflow_scripts.stage import stage_module
from workflow_scripts.stage_code import code_key


def names_pattern(names):
    """A wildcard pattern matching exactly these names (nothing, when there are none)."""
    return "|".join(re.escape(n) for n in sorted(names)) or "(?!)"


# only the config's names: a target naming a model or dataset the config does not have is "no
# rule to produce it", not an error inside a rule's functions
wildcard_constraints:
    model=names_pattern(study.models),
    dataset=names_pattern(study.datasets),
    shard=r"\d+",
    layer=r"\d+",


# --- code: the key of the code a stage runs is a param of its rule (the output cache keys on
# params); every rule runs its stage through the same script (workflow_scripts/stage.py) ---


def stage_code(rule):
    """The key of the code the stage of ``rule`` runs."""
    return code_key(stage_module(rule))


def model_stage_code(rule):
    """A param function: the key of the code of a stage that runs a model, with its family's
    modules (and not the other families')."""

    def key(wildcards):
        family = study.models[wildcards.model].family
        return code_key(stage_module(rule), family.module, family.record)

    return key


def job_resource(stage, key):
    """A resource of a model's job (mem_mb, runtime in minutes) that scales with the model and
    the data, computed from the plan (workflow_scripts/estimate.py)."""

    def value(wildcards):
        return job_resources(study, stage, wildcards.model, wildcards.get("dataset"))[key]

    return value


# --- models and training runs ---


def made_by_this_config(path):
    """Whether a path under results/ names models and datasets of this config (a result of an
    earlier config may be there too): results/<stage>/<model>[/<dataset>...], data/<dataset>,
    tokens/<dataset>/..."""
    parts = Path(path).parts[1:]
    if len(parts) < 2:
        return False
    stage, name = parts[0], Path(parts[1]).name.removesuffix(".parquet")
    if stage in ("data", "tokens"):
        return name in study.datasets
    if stage in ("models", "train"):
        return name in study.models
    if stage in ("activations", "stats", "ablation") and len(parts) > 2:
        dataset = Path(parts[2]).name.removesuffix(".parquet")
        return name in study.models and dataset in study.datasets
    return False


def fetched_model_names():
    return names_pattern(study.fetched_models())


def trained_model_names():
    return names_pattern(study.trained_models())


def model_spec(wildcards):
    """What fetching a model uses of its entry, as JSON."""
    return as_json(study.models[wildcards.model].fetch_spec())


def local_model_files(wildcards):
    """A local: model's files, so a change to them refetches it."""
    model = study.models[wildcards.model]
    if model.source.scheme != "local":
        return []
    return sorted(str(p) for p in Path(model.source.location).rglob("*") if p.is_file())


def run_settings(wildcards):
    return as_json(study.run_of(wildcards.model).settings)


def run_data(wildcards):
    """What a run trains on: a language model's token file, else the stored dataset."""
    run = study.run_of(wildcards.model)
    if run.kind == "causal_lm":
        return f"results/tokens/{run.dataset}/{run.token_file_tokenizer}.npy"
    return f"results/data/{run.dataset}.parquet"


def tokenizer_model(wildcards):
    """The model directory whose tokenizer a token file uses (none for a built-in one)."""
    if wildcards.tokenizer.startswith("builtin-"):
        return []
    return [f"results/models/{wildcards.tokenizer}"]


def builtin_tokenizer(wildcards):
    """The style of the built-in tokenizer a token file uses (none for a model's)."""
    if wildcards.tokenizer.startswith("builtin-"):
        return wildcards.tokenizer.removeprefix("builtin-")
    return None


def run_base(wildcards):
    """The model directory a fine-tune starts from, if any."""
    base = study.run_of(wildcards.model).base
    return [f"results/models/{base}"] if base else []


def run_tokenizer(wildcards):
    """The model directory whose tokenizer a language model uses, if any."""
    tokenizer = study.run_of(wildcards.model).tokenizer
    return [f"results/models/{tokenizer}"] if tokenizer else []


# --- data and activations ---


def dataset_spec(wildcards):
    """What preparing a dataset uses of its entry, as JSON."""
    return as_json(study.datasets[wildcards.dataset].prepare_spec())


def dataset_source_files(wildcards):
    """A parquet: or imagefolder: dataset's files, so a change to them reprepares it (none where
    the path is not there: prepare_data then stops naming it, and a dry run still works)."""
    dataset = study.datasets[wildcards.dataset]
    if dataset.source.scheme == "parquet":  # missing, or a folder: the job says so
        file = Path(dataset.source.location)
        return [str(file)] if file.is_file() else []
    if dataset.source.scheme == "imagefolder":
        return sorted(str(p) for p in Path(dataset.source.location).rglob("*") if p.is_file())
    return []


def extraction_options(wildcards):
    return as_json(study.models[wildcards.model].extract)


def model_dtype(wildcards):
    """The dtype a job loads and runs its model in (models.<name>.dtype)."""
    return study.models[wildcards.model].dtype


def model_placement(wildcards):
    """Where a job puts its model's weights (models.<name>.device_map, max_memory), as JSON;
    not part of the job's cache key (output_cache.NOT_KEYED)."""
    return as_json(study.models[wildcards.model].placement)


def shard_count(wildcards):
    return study.datasets[wildcards.dataset].shards


def readout_count(wildcards):
    return study.models[wildcards.model].readouts


def activation_shards(wildcards):
    return expand(
        "results/activations/{model}/{dataset}/shard-{shard}.zarr",
        model=wildcards.model,
        dataset=wildcards.dataset,
        shard=range(study.datasets[wildcards.dataset].shards),
    )


# --- statistics and ablation ---


def stats_gpus(wildcards):
    """GPUs a layer_stats job asks for: one where stats.device is cuda (the SLURM profile passes
    it to sbatch), none otherwise."""
    return 1 if study.stats_options.device == "cuda" else 0


def stats_options(wildcards):
    return as_json(study.stats_options)


def thresholds(wildcards):
    return list(study.models[wildcards.model].thresholds)


def layer_stats_files(wildcards):
    return expand(
        "results/stats/{model}/{dataset}/layer-{layer}.parquet",
        model=wildcards.model,
        dataset=wildcards.dataset,
        layer=range(study.models[wildcards.model].readouts),
    )


def ablation_options(wildcards):
    return as_json(study.ablation_options)


def all_stats(wildcards=None):
    return [f"results/stats/{model}/{dataset}.parquet" for model, dataset in study.statistics]


def all_ablations(wildcards=None):
    return [f"results/ablation/{model}/{dataset}.parquet" for model, dataset in study.ablations]


# --- figures and tables ---


def all_figures():
    figures = [
        f"results/figures/{figure}-{group.name}.{ext}"
        for group in study.figure_groups.values()
        for figure in group.figures
        for ext in ("png", "pdf")
    ]
    for spec in study.top_examples:
        figures += [
            f"results/figures/top-examples-{spec.model}-{spec.dataset}-layer{spec.layer}.{ext}"
            for ext in ("png", "pdf")
        ]
        figures.append(
            f"results/figures/features-{spec.model}-{spec.dataset}-layer{spec.layer}.html"
        )
    figures += ["results/tables/statistics.csv"]
    if study.ablations:
        figures += ["results/tables/ablation.csv"]
    if study.training_figure:
        figures += [
            f"results/figures/{figure.name}.{ext}"
            for figure in FIGURES.values()
            if not figure.per_group
            for ext in ("png", "pdf")
        ]
    return figures


def group_stats(wildcards):
    group = study.figure_groups[wildcards.group]
    return [f"results/stats/{m}/{d}.parquet" for m in group.models for d in group.datasets]


def group_ablations(wildcards):
    group = study.figure_groups[wildcards.group]
    return [f"results/ablation/{m}/{d}.parquet" for m in group.models for d in group.datasets]


def group_snapshot_stats(wildcards):
    """The statistics of every snapshot of a group's runs, and of the runs themselves."""
    group = study.figure_groups[wildcards.group]
    return [
        f"results/stats/{m}/{d}.parquet"
        for run in group.models
        for m in study.snapshots_of(run)
        for d in group.datasets
    ]


def training_metrics(wildcards):
    return [f"results/train/{run}/metrics.parquet" for run in study.runs]


# what each kind of figure input is (workflow_scripts/figure_registry.py, INPUTS)
FIGURE_INPUTS = {
    "statistics": group_stats,
    "ablation": group_ablations,
    "training": training_metrics,
    "snapshots": group_snapshot_stats,
}


def caption_fields(figure, wildcards):
    """What a figure's caption may state (figure_registry.GROUP_FIELDS, TRAINING_FIELDS): the
    group and the settings its numbers come from, or the training runs."""
    if not figure.per_group:
        return {"runs": ", ".join(study.runs)}
    group = study.figure_groups[wildcards.group]
    return {
        "group": group.name,
        "models": ", ".join(group.models),
        "datasets": ", ".join(group.datasets),
        "thresholds": {m: list(study.models[m].thresholds) for m in group.models},
        "padding": "included" if study.stats_options.include_padding else "excluded",
        "rotations": study.stats_options.rotations,
        "seed": study.stats_options.seed,
    }


def group_regimes(wildcards):
    """{model: the run with seeds it is one seed of}, for a group's figures (a snapshot's: its
    run's), as JSON."""
    regimes = dict(study.figure_groups[wildcards.group].regimes)
    for run, regime in list(regimes.items()):
        regimes |= {model: regime for model in study.snapshots_of(run)}
    return as_json(regimes)


def group_steps(wildcards):
    """{model: training step} of the snapshots of a group's runs and of the runs themselves
    (what the dynamics figure draws against), as JSON."""
    group = study.figure_groups[wildcards.group]
    return as_json({m: s for run in group.models for m, s in study.snapshots_of(run).items()})


def optimizer_basis_seed(wildcards):
    """The seed of the rotated basis a model's optimizer worked in (its stream is also measured
    in that basis), or "" for every other model."""
    model = study.models[wildcards.model]
    if model.run is None:
        return ""
    spec = study.runs[model.run].settings
    return basis_seed(spec) if spec["optimizer"].get("basis") == "rotated" else ""


def run_seeds(wildcards):
    """{trained model: its run's seed}, for the tables, as JSON."""
    return as_json({name: run.settings["seed"] for name, run in study.runs.items()})


def figure_caption(figure):
    """A param function: the figure's report caption, filled in (report/figure.rst shows it)."""

    def caption(wildcards):
        return figure.caption_with(caption_fields(figure, wildcards))

    return caption


def input_order(wildcards, input):
    """The order of a figure's or table's inputs, which is its legend's or rows' order: the
    output cache does not see it otherwise."""
    return list(input.data)


def top_examples_spec(wildcards):
    key = (wildcards.model, wildcards.dataset, int(wildcards.layer))
    return next(s for s in study.top_examples if (s.model, s.dataset, s.layer) == key)


def top_examples_options(wildcards):
    """The settings of a top-examples figure, as JSON."""
    return as_json(top_examples_spec(wildcards).figure)


def feature_page_options(wildcards):
    """The settings of a feature page (workflow_scripts/feature_page.py), as JSON."""
    return as_json(top_examples_spec(wildcards).page)
