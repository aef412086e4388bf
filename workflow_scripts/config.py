"""Configuration: validation against the JSON schema, defaults, and checks across keys.

Imported by the Snakefile at DAG-build time, so it stays light: no torch, no transformers.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import jsonschema
import yaml

from workflow_scripts.sources import (ABLATION_HEADS, BUILTIN_KINDS, TORCHVISION_RESNETS,
                                      dataset_kind, model_head, model_kind, source_scheme)

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
    _check_analyses(config)
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


def _check_models(config: dict) -> None:
    for name, spec in config["models"].items():
        scheme, rest = source_scheme(spec["source"])
        where = f"models.{name}"
        if scheme == "torchvision" and spec["family"] != "resnet":
            raise ConfigError(f"config error at {where}.source: torchvision: models are ResNets; "
                              f"set family: resnet (got {spec['family']!r})")
        if scheme in ("hf", "local") and "blocks" not in spec:
            raise ConfigError(f"config error at {where}: an {scheme}: model needs 'blocks', its "
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
        required, forbidden = ["layers", "widths"], ["width", "heads", "context"]
        if not isinstance(arch.get("layers"), list):
            raise ConfigError(f"config error at {where}.arch.layers: {arch.get('layers')!r}; "
                              "a ResNet needs a list of blocks per stage, e.g. [2, 2, 2, 2]")
        if len(arch.get("widths", [])) != len(arch["layers"]):
            raise ConfigError(f"config error at {where}.arch.widths: {arch.get('widths')!r}; "
                              f"needs one width per stage ({len(arch['layers'])})")
    else:
        required, forbidden = ["layers", "width", "heads"], ["widths", "block", "stem"]
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
        if scheme in ("parquet", "imagefolder") and not os.path.exists(rest):
            raise ConfigError(f"config error at {where}.source: path {rest!r} does not exist "
                              "(paths are relative to the working directory)")
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
