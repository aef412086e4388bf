"""Configuration: validation against the JSON schema, defaults, and checks across keys.

Imported by the Snakefile at DAG-build time, so it stays light: no torch, no transformers.
"""
from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path

import jsonschema
import yaml

from workflow_scripts.sources import (ABLATION_HEADS, BUILTIN_KINDS, TORCHVISION_RESNETS,
                                      dataset_kind, model_head, model_kind, readout_count,
                                      source_scheme)

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """A configuration problem, with a message naming the key, the value and what is allowed."""


def check_config(config: dict) -> dict:
    """Validate ``config`` in place, fill in defaults, and return it.

    Raises ConfigError with one message for the first problem found.
    """
    from snakemake.utils import validate  # fills in the schema's defaults

    config.setdefault("extract", {})
    config.setdefault("stats", {})
    config.setdefault("ablation", {})
    config.setdefault("training", {})
    config.setdefault("figures", {})
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(copy.deepcopy(config)))
    if error is not None:
        raise ConfigError(describe(error))
    validate(config, str(SCHEMA_PATH), set_default=True)
    # a user's thresholds for some families keep the defaults of the others
    family_defaults = schema["definitions"]["stats"]["properties"]["thresholds"]["default"]
    config["stats"]["thresholds"] = {**family_defaults, **config["stats"]["thresholds"]}
    _check_models(config)
    _check_datasets(config)
    config["training"]["runs"] = _expand_runs(config["training"]["runs"], schema)
    _check_runs(config)
    _add_trained_models(config)
    _check_analyses(config)
    _check_contexts(config)
    _check_figures(config)
    for spec in config["figures"]["top_examples"]:
        spec.setdefault("top", 4)
        spec.setdefault("examples", 6)
    return config


def describe(error: jsonschema.ValidationError) -> str:
    """One line: where in the config, the bad value, and what the schema allows there."""
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    schema, value = error.schema, error.instance
    kind = error.validator
    if kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        unknown = sorted(set(value) - set(allowed))
        return (f"config error at {where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"allowed keys: {', '.join(allowed)}")
    if kind == "required":
        return f"config error at {where}: {error.message}"
    if kind == "enum":
        allowed = ", ".join("null" if v is None else str(v) for v in schema["enum"])
        return f"config error at {where}: {value!r} is not allowed; allowed values: {allowed}"
    if kind == "pattern":
        allowed = schema.get("description", f"a string matching {schema['pattern']}")
        return f"config error at {where}: {value!r} is not allowed; expected {allowed}"
    if kind in ("type", "oneOf", "anyOf"):
        return f"config error at {where}: {value!r} has the wrong type; {error.message}"
    return f"config error at {where}: {value!r}: {error.message}"


def _merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else copy.deepcopy(value)
    return merged


def _expand_runs(runs: dict, schema: dict) -> dict:
    """Runs with a grid become one run per combination of its axes' labels."""
    run_schema = {**schema["definitions"]["run"], "definitions": schema["definitions"]}
    expanded = {}
    for name, run in runs.items():
        grid = run.get("grid", {})
        base = {k: v for k, v in run.items() if k != "grid"}
        for labels in itertools.product(*(list(axis.items()) for axis in grid.values())):
            spec = base
            for _, overrides in labels:
                spec = _merge(spec, overrides)
            full = "-".join([name, *(label for label, _ in labels)])
            error = jsonschema.exceptions.best_match(
                jsonschema.Draft202012Validator(run_schema).iter_errors(spec))
            if error is not None:
                error.path.extendleft([full, "runs", "training"])
                raise ConfigError(describe(error) + (" (after the grid)" if grid else ""))
            if full in expanded:
                raise ConfigError(f"config error at training.runs.{name}: run {full!r} is "
                                  "defined twice")
            expanded[full] = spec
    return expanded


def _check_runs(config: dict) -> None:
    for name, run in config["training"]["runs"].items():
        where = f"training.runs.{name}"
        if run["dataset"] not in config["datasets"]:
            raise ConfigError(f"config error at {where}.dataset: {run['dataset']!r} is not "
                              f"defined; defined datasets: {', '.join(sorted(config['datasets']))}")
        kind = dataset_kind(config["datasets"][run["dataset"]])
        needed = {"causal_lm": "text", "image_classification": "image",
                  "sequence_classification": "pairs"}[run["kind"]]
        if kind != needed:
            raise ConfigError(f"config error at {where}.dataset: a {run['kind']} run needs a "
                              f"{needed} dataset; {run['dataset']!r} holds {kind}")
        required = {"causal_lm": ["family", "arch"], "image_classification": ["arch", "num_labels"],
                    "sequence_classification": ["base", "num_labels"]}[run["kind"]]
        for key in required:
            if key not in run:
                raise ConfigError(f"config error at {where}: a {run['kind']} run needs {key!r}")
        if "tokenizer" in run:
            source = config["models"].get(run["tokenizer"])
            if run["kind"] != "causal_lm" or source is None or model_kind(source) != "text":
                raise ConfigError(f"config error at {where}.tokenizer: {run['tokenizer']!r} is "
                                  "not a defined text model, or the run is not causal_lm")
        if ("steps" in run) == ("epochs" in run):
            raise ConfigError(f"config error at {where}: give either 'steps' or 'epochs'")
        if run["kind"] == "sequence_classification":
            runs = config["training"]["runs"]
            base = config["models"].get(run["base"])
            base_run = runs.get(run["base"])  # a fine-tune of another run's model
            if base_run is not None and base_run["kind"] == "image_classification" or \
                    base_run is None and (base is None or model_kind(base) != "text"):
                raise ConfigError(f"config error at {where}.base: {run['base']!r} is not a "
                                  "defined text model or text training run")
            if base is not None and base["family"] == "decoder":
                raise ConfigError(f"config error at {where}.base: {run['base']!r} is a decoder, "
                                  "which has a causal_lm head only; fine-tune a gpt2, gptr2, "
                                  "roberta or bert model")
        if "arch" in run:
            family = run.get("family", "resnet")
            _check_init_arch(where, {"family": family, "arch": run["arch"]})


def _run_model(config: dict, run: dict, seen: tuple = ()) -> tuple[str, int]:
    """The family and block count of the model a run trains (a fine-tune: its base's)."""
    if run["kind"] == "causal_lm":
        return run["family"], run["arch"]["layers"]
    if run["kind"] == "image_classification":
        return "resnet", sum(run["arch"]["layers"])
    runs, base = config["training"]["runs"], run["base"]
    scheme, base_run = source_scheme(config["models"][base]["source"]) if base in config[
        "models"] else ("train", base)
    if scheme == "train":
        if base_run in seen:
            raise ConfigError(f"config error at training.runs: runs fine-tune each other in a "
                              f"circle ({' -> '.join((*seen, base_run))})")
        return _run_model(config, runs[base_run], (*seen, base_run))
    return config["models"][base]["family"], readout_count(config["models"][base]) - 1


def _add_trained_models(config: dict) -> None:
    """Every run is also a model of the same name, source train:<run>."""
    runs = config["training"]["runs"]
    models = {name: _run_model(config, run, (name,)) for name, run in runs.items()}
    for name, run in runs.items():
        family = models[name][0]
        spec = config["models"].setdefault(name, {"family": family, "source": f"train:{name}"})
        if spec["source"] != f"train:{name}" or spec["family"] != family:
            raise ConfigError(f"config error at models.{name}: the name of training run {name!r}; "
                              f"as a model its source is train:{name} and its family {family}")
        spec.setdefault("head", run["kind"])
        if "num_labels" in run:
            spec.setdefault("num_labels", run["num_labels"])
    for name, spec in config["models"].items():
        scheme, run = source_scheme(spec["source"])
        if scheme == "train":
            if run not in runs:
                raise ConfigError(f"config error at models.{name}.source: training run {run!r} is "
                                  f"not defined; defined runs: {', '.join(sorted(runs)) or 'none'}")
            spec["blocks"] = _run_model(config, runs[run], (run,))[1]


def _check_models(config: dict) -> None:
    for name, spec in config["models"].items():
        scheme, rest = source_scheme(spec["source"])
        where = f"models.{name}"
        if scheme == "torchvision" and spec["family"] != "resnet":
            raise ConfigError(f"config error at {where}.source: torchvision: models are ResNets; "
                              f"set family: resnet (got {spec['family']!r})")
        if scheme in ("hf", "local") and "blocks" not in spec:
            raise ConfigError(f"config error at {where}: a model from {scheme}: needs 'blocks', its "
                              "number of residual blocks (e.g. 12 for gpt2), so the per-layer "
                              "jobs are known before the model is fetched")
        if scheme == "torchvision" and rest not in TORCHVISION_RESNETS:
            raise ConfigError(f"config error at {where}.source: {rest!r} is not a known "
                              f"torchvision ResNet; known: {', '.join(TORCHVISION_RESNETS)}")
        if scheme == "local" and not os.path.isdir(rest):
            raise ConfigError(f"config error at {where}.source: local path {rest!r} is not a "
                              "directory (paths are relative to the working directory)")
        if scheme == "init":
            _check_init_arch(where, spec)
        elif "arch" in spec:
            raise ConfigError(f"config error at {where}.arch: architecture settings are only "
                              f"used by init: models, not by {scheme}: sources")


def _check_init_arch(where: str, spec: dict) -> None:
    arch = spec.get("arch")
    if arch is None:
        raise ConfigError(f"config error at {where}: an init: model needs 'arch' settings")
    if spec["family"] == "resnet":
        required, forbidden = ["layers", "widths"], ["width", "heads", "context", "type"]
        if not isinstance(arch.get("layers"), list):
            raise ConfigError(f"config error at {where}.arch.layers: {arch.get('layers')!r}; "
                              "a ResNet needs a list of blocks per stage, e.g. [2, 2, 2, 2]")
        if len(arch.get("widths", [])) != len(arch["layers"]):
            raise ConfigError(f"config error at {where}.arch.widths: {arch.get('widths')!r}; "
                              f"needs one width per stage ({len(arch['layers'])})")
    else:
        required, forbidden = ["layers", "width", "heads"], ["widths", "block", "stem"]
        if spec["family"] != "decoder":  # arch.type picks a decoder's layout
            forbidden.append("type")
        if not isinstance(arch.get("layers"), int):
            raise ConfigError(f"config error at {where}.arch.layers: {arch.get('layers')!r}; "
                              "a transformer needs a number of blocks")
        if "width" in arch and "heads" in arch and arch["width"] % arch["heads"]:
            raise ConfigError(f"config error at {where}.arch.width: {arch['width']} is not "
                              f"divisible by heads ({arch['heads']})")
    for key in required:
        if key not in arch:
            raise ConfigError(f"config error at {where}.arch: missing key {key!r} for family "
                              f"{spec['family']}")
    for key in forbidden:
        if key in arch:
            raise ConfigError(f"config error at {where}.arch.{key}: not a setting of family "
                              f"{spec['family']}; allowed: {', '.join(required)} and others")


def _check_datasets(config: dict) -> None:
    for name, spec in config["datasets"].items():
        scheme, rest = source_scheme(spec["source"])
        where = f"datasets.{name}"
        implied = {"builtin": BUILTIN_KINDS.get(rest), "imagefolder": "image"}.get(scheme)
        if implied is None and "kind" not in spec:
            raise ConfigError(f"config error at {where}: a {scheme}: dataset needs "
                              "'kind' (pairs, text or image)")
        if implied is not None and spec.get("kind", implied) != implied:
            raise ConfigError(f"config error at {where}.kind: {spec['kind']!r} contradicts the "
                              f"source, which holds {implied}")
        if "rows" in spec and spec["shards"] > spec["rows"]:
            raise ConfigError(f"config error at {where}.shards: {spec['shards']} shards for "
                              f"{spec['rows']} rows; shards must not exceed rows")


def _check_analyses(config: dict) -> None:
    for where, analysis in [(f"analyses.{i}", a) for i, a in enumerate(config["analyses"])] + \
            [(f"ablation.analyses.{i}", a) for i, a in enumerate(config["ablation"]["analyses"])]:
        for key, defined in (("models", config["models"]), ("datasets", config["datasets"])):
            for name in analysis[key]:
                if name not in defined:
                    raise ConfigError(f"config error at {where}.{key}: {name!r} is not "
                                      f"defined; defined {key}: {', '.join(sorted(defined))}")
        for model in analysis["models"]:
            for dataset in analysis["datasets"]:
                mk = model_kind(config["models"][model])
                dk = dataset_kind(config["datasets"][dataset])
                if (mk == "image") != (dk == "image"):
                    raise ConfigError(f"config error at {where}: model {model!r} reads "
                                      f"{mk} but dataset {dataset!r} holds {dk}")
                head, needed = model_head(config["models"][model]), ABLATION_HEADS[dk]
                if where.startswith("ablation") and head != needed:
                    raise ConfigError(f"config error at {where}: model {model!r} has head "
                                      f"{head!r}; ablation on {dk} dataset {dataset!r} needs "
                                      f"{needed}")


def _check_contexts(config: dict) -> None:
    """Token lengths that a text model built here (init:, train:) cannot take: a clear error
    now, not an index error in a job."""
    runs = config["training"]["runs"]
    extracted = {m for m, _ in analysis_pairs(config)}
    ablated = {m for m, _ in analysis_pairs(config, config["ablation"]["analyses"])}
    for name, spec in config["models"].items():
        scheme, run = source_scheme(spec["source"])
        arch = spec.get("arch") if scheme == "init" else runs[run].get("arch") if scheme == "train" else None
        if model_kind(spec) != "text" or arch is None:
            continue
        context = arch.get("context", 128)
        lengths = {}
        if name in extracted:
            lengths["extract.max_tokens"] = extract_options(config, name)["max_tokens"]
        if name in ablated:
            lengths["ablation.max_tokens"] = config["ablation"]["max_tokens"]
        if scheme == "train" and runs[run]["kind"] == "causal_lm":
            lengths[f"training.runs.{run}.context"] = runs[run]["context"]
        for key, length in lengths.items():
            if length > context:
                raise ConfigError(f"config error at {key}: {length} tokens, but model {name!r} "
                                  f"takes at most {context} (its arch.context)")


def _check_figures(config: dict) -> None:
    stats = set(analysis_pairs(config))
    for i, spec in enumerate(config["figures"]["top_examples"]):
        where = f"figures.top_examples.{i}"
        if (spec["model"], spec["dataset"]) not in stats:
            raise ConfigError(f"config error at {where}: model {spec['model']!r} has no "
                              f"activations of dataset {spec['dataset']!r}; add the pair to analyses")
        count = readout_count(config["models"][spec["model"]])
        if spec["layer"] >= count:
            raise ConfigError(f"config error at {where}.layer: {spec['layer']}; model "
                              f"{spec['model']!r} has read-out points 0..{count - 1}")
    ablated = set(analysis_pairs(config, config["ablation"]["analyses"]))
    for name, group in config["figures"]["groups"].items():
        for model in group["models"]:
            for dataset in group["datasets"]:
                for figure in group.get("figures", []):
                    have, where = (ablated, "ablation.analyses") if figure == "ablation" else (stats, "analyses")
                    if (model, dataset) not in have:
                        raise ConfigError(
                            f"config error at figures.groups.{name}: model {model!r} has no "
                            f"{'ablation' if figure == 'ablation' else 'statistics'} on dataset "
                            f"{dataset!r} for the {figure} figure; add the pair to {where}")


def extract_options(config: dict, model: str) -> dict:
    """The global extraction options with the model's own overrides on top."""
    return {**config["extract"], **config["models"][model].get("extract", {})}


def analysis_pairs(config: dict, analyses: list[dict] | None = None) -> list[tuple[str, str]]:
    """Every (model, dataset) pair the analyses name, in order, without repeats."""
    pairs = []
    for analysis in config["analyses"] if analyses is None else analyses:
        for model in analysis["models"]:
            for dataset in analysis["datasets"]:
                if (model, dataset) not in pairs:
                    pairs.append((model, dataset))
    return pairs


def thresholds(config: dict, model: str) -> list[float]:
    """The outlier thresholds of a model: its own, else its family's."""
    spec = config["models"][model]
    value = spec.get("thresholds", config["stats"]["thresholds"][spec["family"]])
    return [float(v) for v in (value if isinstance(value, list) else [value])]


def trained_models(config: dict) -> list[str]:
    return [name for name, spec in config["models"].items()
            if source_scheme(spec["source"])[0] == "train"]
