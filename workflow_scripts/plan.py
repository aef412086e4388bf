"""The study's plan: ``resolve(config)`` turns a config into a typed, immutable ``Study``.

The Study says what the workflow computes: every model (trained runs included) with its family,
read-out count, size, extraction options and thresholds; every dataset; every training run with
its grid expanded and its defaults filled in; the (model, dataset) pairs of the statistics and of
the ablation; the figure groups and top-example figures. ``rules/common.smk``, the estimator and
the tests read it; the ``config`` the user wrote is never changed.

Each source is parsed here once (``Model.source``, ``Dataset.source``). What ``config.checked``
checks comes first (the schema, each entry, the names each key refers to); what the models and
datasets must agree on is checked here, on the typed plan: a model reads what its datasets hold,
a model scored under ablation has the head its datasets need, and no text model built here is
given more tokens than its context.

Imported by the Snakefile at DAG-build time, so it stays light: no torch, no transformers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from workflow_scripts import families
from workflow_scripts.config import analysis_pairs, checked, fail, model_shape
from workflow_scripts.options.ablation import AblationOptions
from workflow_scripts.options.extract import ExtractOptions
from workflow_scripts.options.feature_page import FeaturePageOptions
from workflow_scripts.options.placement import Placement, gpus_needed
from workflow_scripts.options.precision import DEFAULT_MODEL_DTYPE, bytes_per_value
from workflow_scripts.options.stats import StatsOptions
from workflow_scripts.options.top_examples import TopExamplesOptions
from workflow_scripts.rst import literal
from workflow_scripts.sources import ABLATION_HEADS, Source, dataset_kind

# what fetching a model uses of its entry: a threshold or an extraction option must not refetch
FETCHED_KEYS = ("family", "source", "arch", "seed", "head", "num_labels")
# what a dataset entry holds that is not the data's business (jobs and the cost estimate)
NOT_PREPARED_KEYS = ("shards", "expected_rows", "expected_tokens")


def freeze(value):
    """``value`` with every dict read-only and every list a tuple."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def as_json(value) -> str:
    """``value`` (frozen or not, options included) as JSON with sorted keys: how settings reach
    a job's params."""
    return json.dumps(value, sort_keys=True, default=_plain)


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)


@dataclass(frozen=True)
class Model:
    name: str
    family: families.Family
    source: Source
    head: str
    blocks: int
    readouts: int  # read-out points: the per-layer statistics jobs
    size: families.ModelSize
    entry: Mapping  # its config entry (a trained model's: family, source, head, num_labels)
    extract: ExtractOptions  # the model's own over the global ones
    thresholds: tuple[float, ...]  # outlier thresholds
    dtype: str = DEFAULT_MODEL_DTYPE  # loaded and run in (workflow_scripts/options/precision.py)
    placement: Placement = Placement()  # whole on one device, or split by accelerate

    @property
    def run(self) -> str | None:
        """The training run that makes this model (or of which it is a snapshot), if any."""
        return self.source.run

    @property
    def step(self) -> int | None:
        """The step of a snapshot of a training run, else None."""
        return self.source.step

    def fetch_spec(self) -> dict:
        return {k: v for k, v in self.entry.items() if k in FETCHED_KEYS}


@dataclass(frozen=True)
class Dataset:
    name: str
    source: Source
    kind: str  # pairs, text or image
    shards: int  # extraction jobs, each over a contiguous block of rows
    entry: Mapping

    @property
    def estimated_rows(self) -> int:
        """Rows for job resources and the cost estimate: ``rows``, else ``expected_rows``."""
        return self.entry.get("rows") or self.entry.get("expected_rows") or 1000

    def prepare_spec(self) -> dict:
        return {k: v for k, v in self.entry.items() if k not in NOT_PREPARED_KEYS}


@dataclass(frozen=True)
class Run:
    name: str
    kind: str  # causal_lm, image_classification or sequence_classification
    dataset: str
    settings: Mapping  # the run's settings after its grid, with every default
    replicate_of: str | None = None  # the run with seeds this is one seed of

    @property
    def base(self) -> str | None:
        """The model a fine-tune starts from."""
        return self.settings.get("base")

    @property
    def tokenizer(self) -> str | None:
        """The model whose tokenizer a language model uses."""
        return self.settings.get("tokenizer")

    @property
    def token_file_tokenizer(self) -> str:
        """What a language model's token file is named after: the model lending its tokenizer,
        or ``builtin-<style>`` for its family's built-in tokenizer."""
        if self.tokenizer:
            return self.tokenizer
        return f"builtin-{families.get(self.settings['family']).tokenizer}"


@dataclass(frozen=True)
class FigureGroup:
    name: str
    models: tuple[str, ...]
    datasets: tuple[str, ...]
    figures: tuple[str, ...]
    # each model that is one seed of a run with seeds: that run, under which its figures show
    # the seeds' mean and spread
    regimes: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class TopExamples:
    model: str
    dataset: str
    layer: int
    figure: TopExamplesOptions
    page: FeaturePageOptions


@dataclass(frozen=True)
class Study:
    models: Mapping[str, Model]
    datasets: Mapping[str, Dataset]
    runs: Mapping[str, Run]
    statistics: tuple[tuple[str, str], ...]  # (model, dataset) pairs with activations
    ablations: tuple[tuple[str, str], ...]  # (model, dataset) pairs scored under ablation
    stats_options: StatsOptions  # the stats options that change the numbers (not the thresholds)
    ablation_options: AblationOptions
    figure_groups: Mapping[str, FigureGroup]
    top_examples: tuple[TopExamples, ...]
    dpi: int
    training_figure: bool  # draw the loss curves of every run
    study_compatible: bool = False  # the study's defaults (config.STUDY_SETTINGS)

    def trained_models(self) -> list[str]:
        """The models of training runs (not their snapshots)."""
        return [n for n, m in self.models.items() if m.run is not None and m.step is None]

    def snapshot_models(self) -> list[str]:
        """The snapshots of training runs (``<run>@<step>``)."""
        return [n for n, m in self.models.items() if m.step is not None]

    def snapshots_of(self, run: str) -> dict[str, int]:
        """{model: step} of run ``run``: its snapshots, then the run's own model at its last step
        (where the run gives its steps; an ``epochs`` run's count is known when it trains)."""
        found = {n: m.step for n, m in self.models.items() if m.run == run and m.step is not None}
        if found and "steps" in self.runs[run].settings:
            found[run] = self.runs[run].settings["steps"]
        return found

    def fetched_models(self) -> list[str]:
        return [name for name, model in self.models.items() if model.run is None]

    def run_of(self, model: str) -> Run:
        return self.runs[self.models[model].run]

    def summary(self) -> dict[str, str]:
        """The study in a few readable lines (the report's front page, reStructuredText: every
        name and source shown as written): its models, datasets, analyses, and the settings that
        shape the numbers."""
        pairs: dict[str, list[str]] = {}
        for model, dataset in self.statistics:
            pairs.setdefault(dataset, []).append(model)
        stats = self.stats_options
        extract_settings = sorted(
            {
                f"padding {m.extract.padding}, at most {m.extract.max_tokens} tokens, "
                f"stored as {m.extract.dtype}"
                for m in self.models.values()
            }
        )
        ablation = self.ablation_options
        settings = (
            f"extraction {' / '.join(extract_settings)}; padding rows "
            f"{'counted' if stats.include_padding else 'excluded'}; per-row values "
            f"averaged over {stats.average}; RMS as {stats.rms.replace('_', ' ')}; "
            f"{stats.rotations} random rotation(s) per layer ({stats.rotation}), "
            f"seed {stats.seed}"
        )
        if self.ablations:
            settings += (
                f"; ablated streams scored {'through' if ablation.final_norm else 'without'}"
                f" the final norm, ablated ResNet blocks pass their shortcut "
                f"{'with' if ablation.shortcut_relu else 'without'} ReLU"
            )
        if self.study_compatible:
            settings = "study-compatible (the study's defaults where the config sets none): " + (
                settings
            )
        lines = {
            "models": "; ".join(
                f"{name} ({model.family.name}, {model.source})"
                for name, model in self.models.items()
            ),
            "datasets": "; ".join(
                f"{name} ({data.source})" for name, data in self.datasets.items()
            ),
            "analyses": "; ".join(
                f"{', '.join(models)} on {dataset}" for dataset, models in pairs.items()
            ),
            "settings": settings,
        }
        return {key: literal(line) for key, line in lines.items()}


def resolve(config: Mapping) -> Study:
    """The plan of the study ``config`` describes; raises ConfigError for a bad config."""
    full = checked(config)
    models = {name: _model(full, name, spec) for name, spec in full["models"].items()}
    datasets = {
        name: Dataset(
            name, Source.parse(spec["source"]), dataset_kind(spec), spec["shards"], freeze(spec)
        )
        for name, spec in full["datasets"].items()
    }
    replicate_of = {
        run: base for base, names in full["training"]["replicates"].items() for run in names
    }
    runs = {
        name: Run(name, run["kind"], run["dataset"], freeze(run), replicate_of.get(name))
        for name, run in full["training"]["runs"].items()
    }
    figures = full["figures"]
    study = Study(
        models=MappingProxyType(models),
        datasets=MappingProxyType(datasets),
        runs=MappingProxyType(runs),
        statistics=tuple(analysis_pairs(full["analyses"])),
        ablations=tuple(analysis_pairs(full["ablation"]["analyses"])),
        stats_options=typed(
            StatsOptions, {k: v for k, v in full["stats"].items() if k != "thresholds"}, "stats"
        ),
        ablation_options=typed(
            AblationOptions,
            {k: v for k, v in full["ablation"].items() if k != "analyses"},
            "ablation",
        ),
        figure_groups=MappingProxyType(
            {
                name: FigureGroup(
                    name,
                    tuple(g["models"]),
                    tuple(g["datasets"]),
                    tuple(g["figures"]),
                    MappingProxyType(
                        {m: replicate_of[m] for m in g["models"] if m in replicate_of}
                    ),
                )
                for name, g in figures["groups"].items()
            }
        ),
        top_examples=tuple(
            _top_examples(spec, models[spec["model"]], full) for spec in figures["top_examples"]
        ),
        dpi=figures["dpi"],
        training_figure=figures["training"] and bool(runs),
        study_compatible=full["study_compatible"],
    )
    _check_reads(study, full)
    _check_contexts(study)
    _check_paths(study)
    return study


def _model(config: dict, name: str, spec: dict) -> Model:
    """A model of the checked config: its head and extraction options, its own else the
    defaults; its outlier thresholds, its own else its family's in ``stats.thresholds`` else the
    family record's."""
    family = families.get(spec["family"])
    shape = model_shape(config, name)
    default = family.default_threshold(config["study_compatible"])
    value = spec.get("thresholds", config["stats"]["thresholds"].get(family.name, default))
    return Model(
        name=name,
        family=family,
        source=Source.parse(spec["source"]),
        head=spec.get("head", family.default_head),
        blocks=shape.blocks,
        readouts=family.readouts(shape.blocks),
        size=shape.size,
        entry=freeze(spec),
        extract=typed(
            ExtractOptions, {**config["extract"], **spec.get("extract", {})}, f"models.{name}"
        ),
        thresholds=tuple(float(v) for v in (value if isinstance(value, list) else [value])),
        dtype=spec.get("dtype", DEFAULT_MODEL_DTYPE),
        placement=_placement(name, spec, family, shape.size),
    )


def _placement(name: str, spec: dict, family: families.Family, size) -> Placement:
    """Where a model's weights go, and the GPUs its jobs ask for: its own ``gpus``, else what
    its weights need in its dtype where it is split, else one."""
    device_map, max_memory = spec.get("device_map"), spec.get("max_memory")
    if device_map is None:
        if max_memory is not None:
            fail(f"models.{name}.max_memory", "it caps the devices of device_map, which is not set")
        return Placement(gpus=spec.get("gpus", 1))
    if family.modality != "text" or family.scalar_rms_norm:
        fail(
            f"models.{name}.device_map",
            f"family {family.name!r} cannot be split over devices: its models are loaded whole",
        )
    dtype = spec.get("dtype", DEFAULT_MODEL_DTYPE)
    gpus = spec.get("gpus") or gpus_needed(size.parameters, bytes_per_value(dtype))
    return Placement(
        device_map=dict(device_map) if isinstance(device_map, Mapping) else device_map,
        max_memory={str(k): v for k, v in max_memory.items()} if max_memory else None,
        gpus=gpus,
    )


# a feature page's defaults (figures.top_examples[].page_examples and page_thumbnail set the
# first two)
FEATURE_PAGE = {"examples": 8, "thumbnail": 48, "outlying": 16, "output_weights": 8}


def _top_examples(spec: dict, model: Model, config: dict) -> TopExamples:
    """A top-examples entry: its figure's and its feature page's options."""
    shared = {
        "layer": spec["layer"],
        "features": list(spec.get("features") or []),
        "include_padding": config["stats"]["include_padding"],
        "max_tokens": model.extract.max_tokens,
    }
    figure = TopExamplesOptions(
        **shared, top=spec["top"], examples=spec["examples"], dpi=config["figures"]["dpi"]
    )
    page = FeaturePageOptions(
        **shared,
        examples=spec.get("page_examples", FEATURE_PAGE["examples"]),
        thumbnail=spec.get("page_thumbnail", FEATURE_PAGE["thumbnail"]),
        outlying=FEATURE_PAGE["outlying"],
        output_weights=FEATURE_PAGE["output_weights"],
    )
    return TopExamples(spec["model"], spec["dataset"], spec["layer"], figure, page)


def typed(kind, settings: Mapping, where: str):
    """Options of ``kind`` from a config section; a name the code and the config do not agree
    on is a ConfigError here, not an error in a job."""
    names = {field.name for field in dataclasses.fields(kind)}
    unknown, missing = set(settings) - names, names - set(settings)
    if unknown or missing:
        problems = [f"unknown {', '.join(sorted(unknown))}"] if unknown else []
        problems += [f"missing {', '.join(sorted(missing))}"] if missing else []
        fail(where, f"{kind.__name__}: {'; '.join(problems)}")
    return kind(**settings)


def _check_reads(study: Study, config: dict) -> None:
    """Every model of an analysis reads what its datasets hold, and every model of an ablation
    analysis has the head its datasets need (``config``: the analyses, for where to point)."""
    sections = [
        ("analyses", config["analyses"]),
        ("ablation.analyses", config["ablation"]["analyses"]),
    ]
    for section, analyses in sections:
        for i, analysis in enumerate(analyses):
            where = f"{section}.{i}"
            for name, data in analysis_pairs([analysis]):
                model, kind = study.models[name], study.datasets[data].kind
                modality = model.family.modality
                if (modality == "image") != (kind == "image"):
                    fail(
                        where,
                        f"model {name!r} reads {modality} but dataset {data!r} holds {kind}",
                    )
                needed = ABLATION_HEADS[kind]
                if section == "ablation.analyses" and model.head != needed:
                    declared = (
                        f"is declared with head {model.head!r}"
                        if "head" in model.entry
                        else f"declares no head, so family {model.family.name}'s default "
                        f"{model.head!r} is assumed (a checkpoint's own head is known only once "
                        "fetched)"
                    )
                    fail(
                        where,
                        f"model {name!r} {declared}; ablation on {kind} dataset {data!r} "
                        f"needs {needed}: set its head: if the checkpoint has one",
                    )


def figure_files(study: Study) -> dict[str, str]:
    """Every file under results/figures/ the study draws (without its extension), and where the
    config asks for it. Names may hold ``-``, which also joins them in these names (as
    rules/figures.smk writes them)."""
    files: dict[str, list[str]] = {}
    for name, group in study.figure_groups.items():
        for figure in group.figures:
            files.setdefault(f"{figure}-{name}", []).append(f"figures.groups.{name} ({figure})")
    for i, spec in enumerate(study.top_examples):
        where = (
            f"figures.top_examples.{i} (model {spec.model!r}, dataset {spec.dataset!r}, "
            f"layer {spec.layer})"
        )
        stem = f"{spec.model}-{spec.dataset}-layer{spec.layer}"
        for prefix in ("top-examples", "features"):
            files.setdefault(f"{prefix}-{stem}", []).append(where)
    return files


def _check_paths(study: Study) -> None:
    """No two figures of the config share a file: model `a-b` on dataset `c` and model `a` on
    dataset `b-c` would both write top-examples-a-b-c-layer1.png, one silently lost."""
    for stem, wheres in figure_files(study).items():
        if len(set(wheres)) > 1:
            fail(
                wheres[1],
                f"writes results/figures/{stem}.*, as {wheres[0]} does: rename a model, dataset "
                "or group so that the names cannot run together",
            )


def _check_contexts(study: Study) -> None:
    """Token lengths that a text model built here (init:, train:) cannot take: a clear error
    now, not an index error in a job."""
    extracted = {m for m, _ in study.statistics}
    ablated = {m for m, _ in study.ablations}
    for name, model in study.models.items():
        run = study.runs[model.run] if model.run is not None else None
        arch = run.settings.get("arch") if run is not None else model.entry.get("arch")
        if model.family.modality != "text" or arch is None:
            continue
        context = arch.get("context", 128)
        lengths = {}
        if name in extracted:
            lengths["extract.max_tokens"] = model.extract.max_tokens
        if name in ablated:
            lengths["ablation.max_tokens"] = study.ablation_options.max_tokens
        if run is not None and run.kind == "causal_lm":
            lengths[f"training.runs.{run.name}.context"] = run.settings["context"]
        for key, length in lengths.items():
            if length > context:
                fail(
                    key,
                    f"{length} tokens, but model {name!r} takes at most {context} (its "
                    "arch.context)",
                )
