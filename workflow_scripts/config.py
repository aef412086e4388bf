"""Configuration checks: the JSON schema (``config.schema.yaml``) and the checks across keys.

``validate(config)`` raises ConfigError with one message for the first problem found and never
changes ``config``. ``checked(config)`` returns what the checks worked on: a copy with the
schema's defaults filled in, every training grid expanded into runs and every run also a model;
``workflow_scripts.plan.resolve`` turns it into the study's plan.

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

import jsonschema
import yaml

from workflow_scripts import families
from workflow_scripts.sources import ABLATION_HEADS, BUILTIN_KINDS, dataset_kind, source_scheme

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
SECTIONS = ("extract", "stats", "ablation", "training", "figures")
# what each training run kind builds from, and the dataset kind it needs
RUN_NEEDS = {
    "causal_lm": (("family", "arch"), "text"),
    "image_classification": (("arch", "num_labels"), "image"),
    "sequence_classification": (("base", "num_labels"), "pairs"),
}


# ``study_compatible: true``: the defaults the study had (George Ogden's "Residual Streams"
# scripts), under any key the config sets itself. Thresholds: the study's scripts pass RoBERTa 4,
# GPT-2 10, ResNet 6 and gptr2-nano 6 (its published results hold no outlier fractions for gptr2).
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
        "thresholds": {"roberta": 4, "gpt2": 10, "gptr2": 6, "resnet": 6},
    },
    "ablation": {
        "padding": "max_length",
        "max_tokens": 128,
        "final_norm": False,
        "shortcut_relu": False,
    },
}


class ConfigError(ValueError):
    """A configuration problem, with a message naming the key, the value and what is allowed."""


def validate(config: Mapping) -> None:
    """Raise ConfigError for the first problem of ``config``; ``config`` is not changed."""
    checked(config)


def checked(config: Mapping) -> dict:
    """A checked copy of ``config``: schema defaults filled in, grids expanded into runs
    (``training.runs``), every run also a model of the same name (source ``train:<run>``), and
    every model's outlier thresholds under ``stats.thresholds`` completed from its family's."""
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
    full["stats"]["thresholds"] = {
        **{name: family.threshold for name, family in families.FAMILIES.items()},
        **full["stats"]["thresholds"],
    }
    for name, spec in full["models"].items():
        _check_model(f"models.{name}", spec)
    _check_datasets(full)
    full["training"]["runs"] = _expand_runs(full["training"]["runs"], schema)
    _check_runs(full)
    _add_trained_models(full)
    _check_analyses(full)
    _check_contexts(full)
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
    """A threshold must be a finite number: NaN would make every outlier fraction 0."""
    values = thresholds if isinstance(thresholds, list) else [thresholds]
    if any(not math.isfinite(t) for t in values):
        fail(where, f"{thresholds!r}: thresholds must be finite numbers")


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
                jsonschema.Draft202012Validator(run_schema).iter_errors(spec)
            )
            if error is not None:
                error.path.extendleft([full, "runs", "training"])
                raise ConfigError(describe(error) + (" (after the grid)" if grid else ""))
            if full in expanded:
                fail(f"training.runs.{name}", f"run {full!r} is defined twice")
            expanded[full] = spec
    return expanded


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
    scheme, rest = source_scheme(spec["source"])
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


def _check_datasets(config: dict) -> None:
    for name, spec in config["datasets"].items():
        scheme, rest = source_scheme(spec["source"])
        where = f"datasets.{name}"
        implied = {"builtin": BUILTIN_KINDS.get(rest), "imagefolder": "image"}.get(scheme)
        if implied is None and "kind" not in spec:
            fail(where, f"a {scheme}: dataset needs 'kind' (pairs, text or image)")
        if implied is not None and spec.get("kind", implied) != implied:
            fail(f"{where}.kind", f"{spec['kind']!r} contradicts the source, which holds {implied}")
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


def run_model(config: dict, run: dict, seen: tuple = ()) -> tuple[str, int]:
    """The family and block count of the model a run trains (a fine-tune: its base's)."""
    family = families.run_family(run)
    if family is not None:
        return family, families.get(family).blocks(run["arch"])
    runs, models, base = config["training"]["runs"], config["models"], run["base"]
    scheme, base_run = source_scheme(models[base]["source"]) if base in models else ("train", base)
    if scheme == "train":
        if base_run in seen:
            fail(
                "training.runs",
                f"runs fine-tune each other in a circle ({' -> '.join((*seen, base_run))})",
            )
        return run_model(config, runs[base_run], (*seen, base_run))
    return models[base]["family"], model_blocks(config, base)


def _add_trained_models(config: dict) -> None:
    """Every run is also a model of the same name, source train:<run>."""
    runs, models = config["training"]["runs"], config["models"]
    trained = {name: run_model(config, run, (name,)) for name, run in runs.items()}
    for name, run in runs.items():
        family = trained[name][0]
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
    for name, spec in models.items():
        scheme, run = source_scheme(spec["source"])
        if scheme == "train" and run not in runs:
            fail(
                f"models.{name}.source",
                f"training run {run!r} is not defined; defined runs: "
                f"{', '.join(sorted(runs)) or 'none'}",
            )


def model_blocks(config: dict, name: str) -> int:
    """The residual blocks of a model, from the config alone (nothing is fetched): its arch
    (init:), its run's model (train:), the family's named architecture (torchvision:), or its
    ``blocks`` key (hf:, local:)."""
    spec = config["models"][name]
    family = families.get(spec["family"])
    scheme, rest = source_scheme(spec["source"])
    if scheme == "init":
        return family.blocks(spec["arch"])
    if scheme == "train":
        return run_model(config, config["training"]["runs"][rest], (rest,))[1]
    if scheme == "torchvision":
        return family.architectures[rest].blocks
    return spec["blocks"]


def model_head(spec: Mapping) -> str:
    """A model's head: its ``head`` key, else its family's default."""
    return spec.get("head", families.get(spec["family"]).default_head)


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
    sections = [
        ("analyses", config["analyses"]),
        ("ablation.analyses", config["ablation"]["analyses"]),
    ]
    for section, analyses in sections:
        for i, analysis in enumerate(analyses):
            where = f"{section}.{i}"
            for key in ("models", "datasets"):
                for name in analysis[key]:
                    if name not in config[key]:
                        fail(
                            f"{where}.{key}",
                            f"{name!r} is not defined; defined {key}: "
                            f"{', '.join(sorted(config[key]))}",
                        )
            for model, dataset in analysis_pairs([analysis]):
                modality = families.get(config["models"][model]["family"]).modality
                kind = dataset_kind(config["datasets"][dataset])
                if (modality == "image") != (kind == "image"):
                    fail(
                        where,
                        f"model {model!r} reads {modality} but dataset {dataset!r} holds {kind}",
                    )
                spec = config["models"][model]
                head, needed = model_head(spec), ABLATION_HEADS[kind]
                if section == "ablation.analyses" and head != needed:
                    declared = (
                        f"is declared with head {head!r}"
                        if "head" in spec
                        else f"declares no head, so family {spec['family']}'s default "
                        f"{head!r} is assumed (a checkpoint's own head is known only once "
                        "fetched)"
                    )
                    fail(
                        where,
                        f"model {model!r} {declared}; ablation on {kind} dataset {dataset!r} "
                        f"needs {needed}: set its head: if the checkpoint has one",
                    )


def extract_options(config: dict, model: str) -> dict:
    """The global extraction options with the model's own overrides on top."""
    return {**config["extract"], **config["models"][model].get("extract", {})}


def _check_contexts(config: dict) -> None:
    """Token lengths that a text model built here (init:, train:) cannot take: a clear error
    now, not an index error in a job."""
    runs = config["training"]["runs"]
    extracted = {m for m, _ in analysis_pairs(config["analyses"])}
    ablated = {m for m, _ in analysis_pairs(config["ablation"]["analyses"])}
    for name, spec in config["models"].items():
        scheme, run = source_scheme(spec["source"])
        arch = {"init": spec.get("arch"), "train": runs.get(run, {}).get("arch")}.get(scheme)
        if families.get(spec["family"]).modality != "text" or arch is None:
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
                fail(
                    key,
                    f"{length} tokens, but model {name!r} takes at most {context} (its "
                    "arch.context)",
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
    ablated = set(analysis_pairs(config["ablation"]["analyses"]))
    for name, group in config["figures"]["groups"].items():
        for model, dataset in analysis_pairs([group]):
            for figure in group["figures"]:
                needs_ablation = figure == "ablation"
                have = ablated if needs_ablation else stats
                if (model, dataset) not in have:
                    fail(
                        f"figures.groups.{name}",
                        f"model {model!r} has no {'ablation' if needs_ablation else 'statistics'} "
                        f"on dataset {dataset!r} for the {figure} figure; add the pair to "
                        f"{'ablation.analyses' if needs_ablation else 'analyses'}",
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
