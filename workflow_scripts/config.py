"""Configuration checks: the JSON schema (``config.schema.yaml``) and the checks across keys.

``validate(config)`` raises ConfigError with one message for the first problem found and never
changes ``config``. ``checked(config)`` returns what the checks here worked on: a copy with the
schema's defaults filled in, every training grid expanded into runs and every run also a model,
each model's entry and each name it refers to checked; ``workflow_scripts.plan.resolve`` turns it
into the study's typed plan and checks what the plan's models and datasets must agree on.

Imported by the Snakefile at DAG-build time, so it stays light: no torch, no transformers.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import jsonschema
import yaml

from workflow_scripts import families, figure_registry
from workflow_scripts.optimizers import optimizer_problem
from workflow_scripts.sources import Source, dataset_kind
from workflow_scripts.stage import InputError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
SECTIONS = ("extract", "stats", "ablation", "training", "figures")
# what each training run kind builds from, and the dataset kind it needs
RUN_NEEDS = {
    "causal_lm": (("family", "arch"), "text"),
    "image_classification": (("arch", "num_labels"), "image"),
    "sequence_classification": (("base", "num_labels"), "pairs"),
}


# ``study_compatible: true``: the defaults the study had (George Ogden's "Residual Streams"
# scripts), under any key the config sets itself; its outlier thresholds are in the family
# records (``Family.default_threshold``).
STUDY_SETTINGS = {
    "extract": {
        "padding": "max_length",
        "max_tokens": 128,
        "gpt2_final_readout": "final_norm",
        "dtype": "float32",
    },
    "stats": {
        "include_padding": True,
        "average": "examples",
        "rms": "root_mean_square",
        "rotations": 1,
        "rotation": "haar",
    },
    "ablation": {
        "padding": "max_length",
        "max_tokens": 128,
        "final_norm": False,
        "shortcut_relu": False,
    },
}


class ConfigError(InputError):
    """A configuration problem, with a message naming the key, the value and what is allowed."""


def validate(config: Mapping) -> None:
    """Raise ConfigError for the first problem of ``config``; ``config`` is not changed."""
    from workflow_scripts.plan import resolve  # the plan is built from what is checked here

    resolve(config)


def checked(config: Mapping) -> dict:
    """A checked copy of ``config``: schema defaults filled in, grids expanded into runs
    (``training.runs``) and every run also a model of the same name (source ``train:<run>``)."""
    from snakemake.utils import validate as fill_defaults

    schema = load_schema()
    full = copy.deepcopy(dict(config))
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(full)
    )
    if error is not None:
        raise ConfigError(describe(error))
    for section in SECTIONS:
        full.setdefault(section, {})
    if full.get("study_compatible"):
        full = _merge(STUDY_SETTINGS, full)
    fill_defaults(full, str(SCHEMA_PATH), set_default=True)
    _check_families(full)
    for name, spec in full["models"].items():
        _check_model(f"models.{name}", spec)
    _check_datasets(full)
    full["training"]["runs"], replicates = _expand_runs(full["training"]["runs"], schema)
    full["training"]["replicates"] = replicates
    _check_runs(full)
    _add_trained_models(full)
    _check_optimizers(full)
    _name_replicates(full, replicates)
    _analyse_snapshots(full)
    _check_analyses(full)
    _check_figures(full)
    item = schema["definitions"]["figures"]["properties"]["top_examples"]["items"]
    for spec in full["figures"]["top_examples"]:  # defaults inside a list are not filled in
        for key, setting in item["properties"].items():
            if "default" in setting:
                spec.setdefault(key, setting["default"])
    return full


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def describe(error: jsonschema.ValidationError) -> str:
    """One line: where in the config, the bad value, and what the schema allows there."""
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    schema, value, rule = error.schema, error.instance, error.validator
    if rule == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        unknown = sorted(set(value) - set(allowed))
        return (
            f"config error at {where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed keys: {', '.join(allowed)}"
        )
    if rule == "required":
        return f"config error at {where}: {error.message}"
    if rule == "enum":
        allowed = ", ".join("null" if v is None else str(v) for v in schema["enum"])
        return f"config error at {where}: {value!r} is not allowed; allowed values: {allowed}"
    if rule == "pattern":
        allowed = schema.get("description", f"a string matching {schema['pattern']}")
        return f"config error at {where}: {value!r} is not allowed; expected {allowed}"
    if rule in ("type", "oneOf", "anyOf"):
        return f"config error at {where}: {value!r} has the wrong type; {error.message}"
    return f"config error at {where}: {value!r}: {error.message}"


def fail(where: str, message: str):
    raise ConfigError(f"config error at {where}: {message}")


def family_of(where: str, name: str) -> families.Family:
    """The registry record of family ``name``, or a config error at ``where``."""
    try:
        return families.get(name)
    except families.UnknownFamilyError as error:
        fail(where, str(error))


def _check_families(config: dict) -> None:
    for name, spec in config["models"].items():
        family_of(f"models.{name}.family", spec["family"])
        _check_thresholds(f"models.{name}.thresholds", spec.get("thresholds", []))
    for name, thresholds in config["stats"]["thresholds"].items():
        family_of(f"stats.thresholds.{name}", name)
        _check_thresholds(f"stats.thresholds.{name}", thresholds)


def _check_thresholds(where: str, thresholds) -> None:
    """A threshold must be a finite number above 0: NaN would make every outlier fraction 0, and
    0 or less would count every feature an outlier."""
    values = thresholds if isinstance(thresholds, list) else [thresholds]
    if any(not math.isfinite(t) for t in values):
        fail(where, f"{thresholds!r}: thresholds must be finite numbers")
    if any(t <= 0 for t in values):
        fail(where, f"{thresholds!r}: thresholds must be above 0 (|x| > t counts an outlier)")


DEFAULT_CONFIG = "config.yaml"  # in the working directory


def with_defaults(config: Mapping) -> dict:
    """The config Snakemake gives the Snakefile, completed: a config with ``models`` came from
    ``--configfile`` (with any ``--config`` values merged in) and stands alone; any other is
    ``--config`` values alone, merged over the default config, ``config.yaml``. Either way the
    scalars Snakemake left as strings are typed (see :func:`with_overrides`)."""
    if "models" in config:
        return with_overrides({}, config)
    if not Path(DEFAULT_CONFIG).is_file():
        raise ConfigError(
            f"no config: {DEFAULT_CONFIG} is not in the working directory {os.getcwd()} and no "
            "--configfile was given"
        )
    return with_overrides(yaml.safe_load(Path(DEFAULT_CONFIG).read_text()), config)


def with_overrides(config: Mapping, overrides: Mapping) -> dict:
    """``config`` with the ``--config`` values merged over it, nested keys included. Snakemake
    parses a nested value (``extract={batch_size: 8}``) with every scalar as a string; here the
    scalars of YAML 1.2's core schema are typed (8, 0.5, 1e-3, true, false, null) and every
    other string stays a string (0x10, yes, 1:2)."""
    return _merge(dict(config), _typed(dict(overrides)))


def _typed(value):
    if isinstance(value, Mapping):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_typed(item) for item in value]
    if isinstance(value, str):  # YAML 1.2's core scalars only: no 0x10, yes/no, 1:2 or ~
        text = value.strip()
        if re.fullmatch(r"[-+]?[0-9]+", text):
            return int(text)
        if re.fullmatch(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?", text):
            return float(text)
        return {"true": True, "false": False, "null": None}.get(text.lower(), value)
    return value


def _merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if nested else copy.deepcopy(value)
    return merged


def _expand_runs(runs: dict, schema: dict) -> tuple[dict, dict]:
    """Runs with a grid become one run per combination of its axes' labels, and a run with
    ``seeds`` one run per seed, named ``<run>-s<seed>`` (after the grid's labels). Returns the
    runs and the replicates: {a run with seeds: the names of its runs, one per seed}."""
    run_schema = {**schema["definitions"]["run"], "definitions": schema["definitions"]}
    expanded, replicates = {}, {}
    for name, run in runs.items():
        grid = run.get("grid", {})
        base = {k: v for k, v in run.items() if k != "grid"}
        for labels in itertools.product(*(list(axis.items()) for axis in grid.values())):
            spec = base
            for _, overrides in labels:
                spec = _merge(spec, overrides)
            full = "-".join([name, *(label for label, _ in labels)])
            error = jsonschema.exceptions.best_match(
                jsonschema.Draft202012Validator(run_schema).iter_errors(spec)
            )
            if error is not None:
                error.path.extendleft([full, "runs", "training"])
                raise ConfigError(describe(error) + (" (after the grid)" if grid else ""))
            seeds = spec.get("seeds")
            spec = {k: v for k, v in spec.items() if k != "seeds"}
            if "snapshots" in spec:  # the steps themselves, as training keeps them
                spec["snapshots"] = snapshot_steps(f"training.runs.{full}", spec)
            named = {full: spec}
            if seeds is not None:
                named = {f"{full}-s{seed}": {**spec, "seed": seed} for seed in seeds}
                replicates[full] = list(named)
            for run_name, run_spec in named.items():
                if run_name in expanded:
                    fail(f"training.runs.{name}", f"run {run_name!r} is defined twice")
                expanded[run_name] = run_spec
    return expanded, replicates


def _name_replicates(config: dict, replicates: dict) -> None:
    """Where an analysis or a figure group names a run with seeds, it names its runs, one per
    seed; a top-examples figure, which shows one model, names one of them."""
    for analyses in (config["analyses"], config["ablation"]["analyses"]):
        for analysis in analyses:
            analysis["models"] = _replicated(analysis["models"], replicates)
    for group in config["figures"]["groups"].values():
        group["models"] = _replicated(group["models"], replicates)
    for i, spec in enumerate(config["figures"]["top_examples"]):
        if spec["model"] in replicates:
            fail(
                f"figures.top_examples.{i}.model",
                f"{spec['model']!r} has one run per seed; name one of them: "
                f"{', '.join(replicates[spec['model']])}",
            )


def snapshots_of(config: dict, run: str) -> list[str]:
    """The snapshot models of run ``run`` (none where it is not a run or keeps none)."""
    spec = config["training"]["runs"].get(run, {})
    return [snapshot_name(run, step) for step in spec.get("snapshots", [])]


def _analyse_snapshots(config: dict) -> None:
    """A figure group that draws the training dynamics has the statistics of every snapshot of
    its runs (an analysis of them and its datasets, added here); each of its models must be a
    run that keeps snapshots."""
    for name, group in config["figures"]["groups"].items():
        if not any(
            figure_registry.FIGURES[k].inputs == "snapshots"
            for k in group["figures"]
            if k in figure_registry.FIGURES
        ):
            continue
        snapshots = []
        for model in group["models"]:
            if not snapshots_of(config, model):
                fail(
                    f"figures.groups.{name}.models",
                    f"{model!r} keeps no snapshots (training.runs.<run>.snapshots), which its "
                    "dynamics figure draws",
                )
            snapshots += [*snapshots_of(config, model), model]
        config["analyses"].append({"models": snapshots, "datasets": list(group["datasets"])})


def _replicated(names: list[str], replicates: dict) -> list[str]:
    return [run for name in names for run in replicates.get(name, [name])]


def check_arch(where: str, family: families.Family, arch: Mapping | None) -> None:
    """The ``arch`` settings of a model built here: the family's keys, and its own checks."""
    if arch is None:
        fail(where, "an init: model needs 'arch' settings")
    for key in family.arch_required:
        if key not in arch:
            fail(f"{where}.arch", f"missing key {key!r} for family {family.name}")
    allowed = (*family.arch_required, *family.arch_optional)
    for key in arch:
        if key not in allowed:
            fail(
                f"{where}.arch.{key}",
                f"not a setting of family {family.name}; allowed: {', '.join(allowed)}",
            )
    problem = family.check_arch(f"{where}.arch", arch)
    if problem:
        raise ConfigError(f"config error at {problem}")


def _check_model(where: str, spec: dict) -> None:
    source = Source.parse(spec["source"])
    scheme, rest = source.scheme, source.location
    family = families.get(spec["family"])
    if "head" in spec and spec["head"] not in family.heads:
        fail(
            f"{where}.head",
            f"{spec['head']!r}; family {family.name} has heads {', '.join(family.heads)}",
        )
    if scheme == "torchvision" and not family.architectures:
        fail(
            f"{where}.source",
            f"torchvision: models are ResNets; set family: resnet (got {family.name!r})",
        )
    if scheme == "torchvision" and rest not in family.architectures:
        fail(
            f"{where}.source",
            f"{rest!r} is not a known torchvision ResNet; known: {', '.join(family.architectures)}",
        )
    if scheme in ("hf", "local") and "blocks" not in spec:
        fail(
            where,
            f"a model from {scheme}: needs 'blocks', its number of residual blocks (e.g. 12 "
            "for gpt2), so the per-layer jobs are known before the model is fetched",
        )
    if scheme == "local" and not os.path.isdir(rest):
        fail(
            f"{where}.source",
            f"local path {rest!r} is not a directory (paths are relative to the working directory)",
        )
    if scheme == "init":
        check_arch(where, family, spec.get("arch"))
    elif "arch" in spec:
        fail(
            f"{where}.arch",
            f"architecture settings are only used by init: models, not by {scheme}: sources",
        )


BUILTIN_ROWS = 10_000_000  # what a built-in set gives in minutes, not years


def _check_datasets(config: dict) -> None:
    for name, spec in config["datasets"].items():
        source = Source.parse(spec["source"])
        where = f"datasets.{name}"
        implied = source.holds
        if implied is None and "kind" not in spec:
            fail(where, f"a {source.scheme}: dataset needs 'kind' (pairs, text or image)")
        if implied is not None and spec.get("kind", implied) != implied:
            fail(f"{where}.kind", f"{spec['kind']!r} contradicts the source, which holds {implied}")
        if source.scheme == "builtin" and spec.get("rows", 0) > BUILTIN_ROWS:
            fail(
                f"{where}.rows",
                f"{spec['rows']} rows of a built-in set, which are generated: at most "
                f"{BUILTIN_ROWS:_}",
            )
        if "rows" in spec and spec["shards"] > spec["rows"]:
            fail(
                f"{where}.shards",
                f"{spec['shards']} shards for {spec['rows']} rows; shards must not exceed rows",
            )


def _check_runs(config: dict) -> None:
    runs, models = config["training"]["runs"], config["models"]
    for name, run in runs.items():
        where = f"training.runs.{name}"
        required, needed = RUN_NEEDS[run["kind"]]
        if run["dataset"] not in config["datasets"]:
            fail(
                f"{where}.dataset",
                f"{run['dataset']!r} is not defined; defined datasets: "
                f"{', '.join(sorted(config['datasets']))}",
            )
        kind = dataset_kind(config["datasets"][run["dataset"]])
        if kind != needed:
            fail(
                f"{where}.dataset",
                f"a {run['kind']} run needs a {needed} dataset; {run['dataset']!r} holds {kind}",
            )
        for key in required:
            if key not in run:
                fail(where, f"a {run['kind']} run needs {key!r}")
        if ("steps" in run) == ("epochs" in run):
            fail(where, "give either 'steps' or 'epochs'")
        if "tokenizer" in run:
            source = models.get(run["tokenizer"])
            lends = source is not None and families.get(source["family"]).modality == "text"
            if run["kind"] != "causal_lm" or not lends:
                fail(
                    f"{where}.tokenizer",
                    f"{run['tokenizer']!r} is not a defined text model, or the run is not "
                    "causal_lm",
                )
        if run["kind"] == "sequence_classification":
            _check_fine_tune(where, run["base"], models, runs)
        else:
            family = family_of(f"{where}.family", families.run_family(run))
            if run["kind"] not in family.trained_by:
                fail(
                    f"{where}.family",
                    f"family {family.name} cannot be trained by a {run['kind']} run",
                )
            check_arch(where, family, run["arch"])


def _check_fine_tune(where: str, base: str, models: dict, runs: dict) -> None:
    base_run = runs.get(base)  # a fine-tune of another run's model
    if base_run is not None and base_run["kind"] != "image_classification":
        return
    family = families.get(models[base]["family"]) if base in models else None
    if base_run is not None or family is None or family.modality != "text":
        fail(f"{where}.base", f"{base!r} is not a defined text model or text training run")
    if "sequence_classification" not in family.trained_by:
        fail(
            f"{where}.base",
            f"{base!r} is a {family.name}, which has a {family.default_head} head only; "
            "fine-tune a "
            + ", ".join(
                n for n, f in families.FAMILIES.items() if "sequence_classification" in f.trained_by
            )
            + " model",
        )


class Shape(NamedTuple):
    """A model as the config alone says it is (nothing is fetched): its family, its residual
    blocks and its size."""

    family: str
    blocks: int
    size: families.ModelSize


def run_shape(config: dict, name: str, seen: tuple[str, ...] = ()) -> Shape:
    """The shape of the model that training run ``name`` makes: built from its arch (with a real
    vocabulary where it uses another model's tokenizer), or a fine-tune's base's; ``seen``: the
    runs it was reached through."""
    runs, models = config["training"]["runs"], config["models"]
    run = runs[name]
    family = families.run_family(run)
    if family is not None:
        record = families.get(family)
        blocks = record.blocks(run["arch"])
        size = record.size(blocks, run["arch"], vocabulary="tokenizer" in run)
        return Shape(family, blocks, size)
    base = run["base"]
    base_run = Source.parse(models[base]["source"]).run if base in models else base
    if base_run is None:
        return model_shape(config, base)
    if base_run in seen:
        fail(
            "training.runs",
            f"runs fine-tune each other in a circle ({' -> '.join((*seen, base_run))})",
        )
    return run_shape(config, base_run, (*seen, base_run))


def model_shape(config: dict, name: str) -> Shape:
    """The shape of model ``name``, from its source: its arch (init:), its run's model (train:),
    its family's named architecture (torchvision:), or its ``blocks`` and ``width`` keys (hf:,
    local:)."""
    spec = config["models"][name]
    family = families.get(spec["family"])
    source = Source.parse(spec["source"])
    if source.run is not None:
        return run_shape(config, source.run, (source.run,))
    if source.scheme == "torchvision":
        blocks = family.architectures[source.location].blocks
        return Shape(family.name, blocks, family.size(blocks, architecture=source.location))
    blocks = family.blocks(spec["arch"]) if source.scheme == "init" else spec["blocks"]
    vocabulary = source.scheme != "init"
    size = family.size(blocks, spec.get("arch"), spec.get("width"), vocabulary=vocabulary)
    return Shape(family.name, blocks, size)


def model_blocks(config: dict, name: str) -> int:
    """The residual blocks of model ``name``, from the config alone."""
    return model_shape(config, name).blocks


def _check_optimizers(config: dict) -> None:
    """Each run's optimizer fits the model it trains (``optimizers.optimizer_problem``: Muon's
    matrices, a rotated basis only where the norms commute with rotations)."""
    for name, run in config["training"]["runs"].items():
        model = run["base"] if run["kind"] == "sequence_classification" else name
        family = families.get(config["models"][model]["family"])
        problem = optimizer_problem(run["kind"], family, run["optimizer"])
        if problem:
            fail(f"training.runs.{name}.optimizer", problem)


def snapshot_name(run: str, step: int) -> str:
    """The model of run ``run`` after ``step`` steps."""
    return f"{run}@{step}"


def snapshot_steps(where: str, run: dict) -> list[int]:
    """The steps a run keeps its model at (``snapshots``): the steps listed, or that many steps
    spaced evenly on a log scale from step 1, followed by the run's last step (its own model)."""
    wanted = run.get("snapshots")
    if wanted is None:
        return []
    if isinstance(wanted, list):
        steps = sorted(set(wanted))
        if "steps" in run and steps[-1] >= run["steps"]:
            fail(
                f"{where}.snapshots",
                f"step {steps[-1]} is not before the run's last step {run['steps']} (the run's "
                "own model is its last)",
            )
        return steps
    if "steps" not in run:
        fail(f"{where}.snapshots", "a count of snapshots needs the run's steps; list the steps")
    last = run["steps"] - 1
    if wanted > last:
        fail(f"{where}.snapshots", f"{wanted} snapshots; a run of {run['steps']} steps has {last}")
    ratio = math.log(run["steps"]) / wanted  # the run's own model is the last of wanted + 1
    steps = sorted({min(last, round(math.exp(i * ratio))) for i in range(wanted)})
    k = 1  # rounding may merge neighbours at the start: fill from the smallest free steps
    while len(steps) < wanted:
        if k not in steps:
            steps = sorted({*steps, k})
        k += 1
    return steps


def _add_trained_models(config: dict) -> None:
    """Every run is also a model of the same name, source train:<run>, and each of its
    snapshots one named <run>@<step>, source train:<run>@<step>."""
    runs, models = config["training"]["runs"], config["models"]
    trained = {name: run_shape(config, name, (name,)).family for name in runs}
    for name, run in runs.items():
        family = trained[name]
        spec = models.setdefault(name, {"family": family, "source": f"train:{name}"})
        if spec["source"] != f"train:{name}" or spec["family"] != family:
            fail(
                f"models.{name}",
                f"the name of training run {name!r}; as a model its source is train:{name} and "
                f"its family {family}",
            )
        spec.setdefault("head", run["kind"])
        if "num_labels" in run:
            spec.setdefault("num_labels", run["num_labels"])
        for step in run.get("snapshots", []):  # a model of its own, as the run itself is
            snapshot = {**spec, "source": f"train:{name}@{step}"}
            models[snapshot_name(name, step)] = snapshot
    for name, spec in models.items():
        run = Source.parse(spec["source"]).run
        if run is not None and run not in runs:
            fail(
                f"models.{name}.source",
                f"training run {run!r} is not defined; defined runs: "
                f"{', '.join(sorted(runs)) or 'none'}",
            )


def analysis_pairs(analyses: list[dict]) -> list[tuple[str, str]]:
    """Every (model, dataset) pair the analyses name, in order, without repeats."""
    pairs = []
    for analysis in analyses:
        for model in analysis["models"]:
            for dataset in analysis["datasets"]:
                if (model, dataset) not in pairs:
                    pairs.append((model, dataset))
    return pairs


def _check_analyses(config: dict) -> None:
    """Every model and dataset an analysis names is defined (what the models read and hold, and
    the heads ablation needs, are checked on the plan: ``workflow_scripts.plan``)."""
    sections = [
        ("analyses", config["analyses"]),
        ("ablation.analyses", config["ablation"]["analyses"]),
    ]
    for section, analyses in sections:
        for i, analysis in enumerate(analyses):
            for key in ("models", "datasets"):
                for name in analysis[key]:
                    if name not in config[key]:
                        fail(
                            f"{section}.{i}.{key}",
                            f"{name!r} is not defined; defined {key}: "
                            f"{', '.join(sorted(config[key]))}",
                        )


def _check_figures(config: dict) -> None:
    stats = set(analysis_pairs(config["analyses"]))
    for i, spec in enumerate(config["figures"]["top_examples"]):
        where = f"figures.top_examples.{i}"
        if (spec["model"], spec["dataset"]) not in stats:
            fail(
                where,
                f"model {spec['model']!r} has no activations of dataset {spec['dataset']!r}; "
                "add the pair to analyses",
            )
        model = config["models"][spec["model"]]
        count = families.get(model["family"]).readouts(model_blocks(config, spec["model"]))
        if spec["layer"] >= count:
            fail(
                f"{where}.layer",
                f"{spec['layer']}; model {spec['model']!r} has read-out points 0..{count - 1}",
            )
    # what a group figure reads: the pairs that have it, and the key that lists them
    results = {
        "statistics": (stats, "analyses"),
        "snapshots": (stats, "analyses"),
        "ablation": (set(analysis_pairs(config["ablation"]["analyses"])), "ablation.analyses"),
    }
    kinds = figure_registry.group_figures()
    for name, group in config["figures"]["groups"].items():
        for i, kind in enumerate(group["figures"]):
            if kind not in kinds:
                fail(
                    f"figures.groups.{name}.figures.{i}",
                    f"{kind!r} is not allowed; allowed values: {', '.join(kinds)}",
                )
        for model, dataset in analysis_pairs([group]):
            for kind in group["figures"]:
                inputs = figure_registry.FIGURES[kind].inputs
                have, key = results[inputs]
                if (model, dataset) not in have:
                    fail(
                        f"figures.groups.{name}",
                        f"model {model!r} has no {inputs} on dataset {dataset!r} for the {kind} "
                        f"figure; add the pair to {key}",
                    )


def load(path: str | os.PathLike) -> dict:
    """A config file, read as YAML; a syntax error names the file, line and column (Snakemake's
    own message for a --configfile that does not parse names neither)."""
    try:
        with open(path) as handle:
            loaded = yaml.safe_load(handle)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({error.problem or error.context})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections, not {type(loaded).__name__}")
    return loaded


def main(argv: list[str] | None = None) -> None:
    """Check config files without Snakemake: YAML syntax (with the line), schema and keys."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("configfiles", nargs="+")
    args = parser.parse_args(argv)
    failed = False
    for path in args.configfiles:
        try:
            validate(load(path))
            print(f"{path}: valid")
        except ConfigError as error:
            print(error, file=sys.stderr)
            failed = True
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
