"""The stage layer: the one way a rule runs its stage.

A stage is a module with a ``run`` function whose parameters are its rule's named inputs,
outputs and params, plus ``threads`` if it uses the job's cores. Every rule runs the same
script, ``scripts/stage.py``, which calls ``run_job(snakemake)``: it sends the job's output to
its log, sets the threads, finds the stage of the rule in ``STAGES``, turns each value into the
type the stage's ``run`` declares (a path, a list of paths, a number, an options dataclass from
JSON), calls it, and ends bad input with one line that names the job. A stage's outputs are
written atomically by the stage itself (``atomic.written``): a training run resumes from the
checkpoint it keeps beside its final output.

Imported by the Snakefile at DAG-build time: it stays light (no torch).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path

# rule name -> the module that holds its stage's ``run``
STAGES = {
    "fetch_model": "workflow_scripts.fetch_model",
    "prepare_data": "workflow_scripts.prepare_data",
    "tokenize": "workflow_scripts.tokenize",
    "train": "workflow_scripts.train",
    "snapshot": "workflow_scripts.snapshot",
    "extract": "workflow_scripts.extract",
    "layer_stats": "workflow_scripts.layer_stats",
    "merge_stats": "workflow_scripts.merge_stats",
    "ablate": "workflow_scripts.ablate",
    "figure_top_examples": "workflow_scripts.top_examples",
    "feature_page": "workflow_scripts.feature_page",
    "table_statistics": "workflow_scripts.report_tables",
    "table_ablation": "workflow_scripts.report_tables",
}
# what a rule passes for the cache and the report only (params, and inputs that the cache must
# see): a stage takes them if it declares them
KEY_ONLY = ("code", "order", "caption", "source_files")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class InputError(ValueError):
    """Input a stage cannot use (a bad file, a config value that does not fit the data): the job
    ends with this one line, not a traceback."""


def stage_module(rule: str) -> str:
    """The module of the stage that ``rule`` runs."""
    if rule.startswith("figure_") and rule not in STAGES:
        return "workflow_scripts.figures"
    try:
        return STAGES[rule]
    except KeyError:
        raise KeyError(f"rule {rule!r} runs no stage: add it to stage.STAGES") from None


def stage_function(rule: str):
    return importlib.import_module(stage_module(rule)).run


def arguments(function, named: Mapping[str, object], threads: int | None = None) -> dict:
    """Keyword arguments of ``function`` from a job's named values, each turned into the type
    that ``function`` declares; a name it does not declare is an error, except KEY_ONLY ones."""
    signature = inspect.signature(function)
    hints = typing.get_type_hints(function)
    unknown = set(named) - set(signature.parameters) - set(KEY_ONLY)
    if unknown:
        raise TypeError(f"{function.__module__}.run takes no {', '.join(sorted(unknown))}")
    values = {name: value for name, value in named.items() if name in signature.parameters}
    if "threads" in signature.parameters and threads is not None:
        values["threads"] = threads
    return {name: convert(value, hints.get(name, object)) for name, value in values.items()}


def convert(value, kind):
    """``value`` as a Snakemake job holds it (a string, a list of paths, a JSON string) turned
    into ``kind``: str, int, float, bool, Path, list[...], an optional type, a dataclass or a
    Mapping (both from JSON)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None or value == "" or (isinstance(value, list | tuple) and not value):
            return None
        return convert(value, options[0])
    if origin in (list, tuple):
        (item,) = typing.get_args(kind)[:1] or (object,)
        if isinstance(value, str) and item not in (str, Path):  # one path is a list of one
            raise TypeError(f"a list expected, got the string {value!r}")
        items = [value] if isinstance(value, str) else list(value)
        return [convert(v, item) for v in items]
    if isinstance(value, list | tuple) and kind is not object:
        if len(value) != 1:
            raise TypeError(f"one value expected, got {len(value)}: {value!r}")
        value = value[0]
    if dataclasses.is_dataclass(kind):
        return from_json(kind, value)
    if kind in (dict, Mapping) or origin in (dict, Mapping):
        return json.loads(value) if isinstance(value, str) else dict(value)
    if kind is bool:
        return value if isinstance(value, bool) else json.loads(str(value).lower())
    if kind in (str, int, float, Path):
        return kind(value)
    return value


def from_json(kind, value):
    """A dataclass from its JSON (or an instance, or a mapping); an unknown key is an error."""
    if isinstance(value, kind):
        return value
    fields = json.loads(value) if isinstance(value, str) else dict(value)
    try:
        return kind(**fields)
    except TypeError as error:
        raise TypeError(f"{kind.__name__}: {error}") from None


def _log_to(path: str | None) -> None:
    """Send this process's stderr (Python's and the C libraries') to the job's log."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as log:
            os.dup2(log.fileno(), sys.stderr.fileno())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT, force=True)


def _set_threads(threads: int) -> None:
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(threads)
    if "torch" in sys.modules:  # only where the stage uses it: importing it takes seconds
        sys.modules["torch"].set_num_threads(threads)


def job_name(rule: str, wildcards: Mapping) -> str:
    where = ", ".join(f"{k}={v}" for k, v in wildcards.items())
    return f"{rule} ({where})" if where else rule


def run_job(snakemake) -> None:
    """Run the stage of a Snakemake job (the ``snakemake`` object of a ``script:``), through the
    output cache (``workflow_scripts.output_cache``): a job whose key has an entry links it."""
    from workflow_scripts import output_cache

    inputs, outputs = dict(snakemake.input.items()), dict(snakemake.output.items())
    params = dict(snakemake.params.items())
    named = {**inputs, **outputs, **params}
    log = snakemake.log[0] if snakemake.log else None
    wildcards = dict(snakemake.wildcards.items())
    cache = output_cache.folder()
    if cache is None:
        run_stage(snakemake.rule, named, snakemake.threads, log, wildcards)
        return
    _log_to(log)
    name = job_name(snakemake.rule, wildcards)
    gone = [p for p in snakemake.input if Path(p).is_symlink() and not Path(p).exists()]
    if gone:  # Snakemake takes a link to a deleted entry for an existing result
        logging.getLogger("stage").error(
            "%s: %s links to a deleted output cache entry; run `python -m "
            "workflow_scripts.output_cache prune` here, then run again to make it anew",
            name,
            gone[0],
        )
        sys.exit(1)
    try:
        output_cache.checked_folder(cache)
        for path in snakemake.input:  # what this job reads from the cache, as it was stored
            if (entry := output_cache.cache_entry(path)) is not None:
                output_cache.verify(entry)
        key = output_cache.job_key(snakemake.rule, inputs, params)
        entry = output_cache.restore(key, outputs, cache)
    except output_cache.CacheError as error:
        logging.getLogger("stage").error("%s: %s", name, error)
        sys.exit(1)
    if entry is not None:
        print(f"{output_cache.HIT}: {entry}", file=sys.stderr)
        return
    run_stage(snakemake.rule, named, snakemake.threads, None, wildcards)
    entry = output_cache.store(key, outputs, cache, snakemake.rule)
    print(f"{output_cache.STORED}: {entry}", file=sys.stderr)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def run_stage(
    rule: str, named: Mapping, threads: int, log: str | None, wildcards: Mapping | None = None
) -> None:
    """Run the stage of ``rule`` on a job's named values, as every job runs: stderr to ``log``
    (where given), the threads set (before torch is imported, and in torch after), bad input one
    line."""
    _log_to(log)
    _set_threads(threads)
    # SIGTERM (Snakemake stopping, SLURM preempting or timing out) unwinds like an error, so
    # that the outputs being written are removed (``atomic.written``), not left for later
    signal.signal(signal.SIGTERM, _terminated)
    name = job_name(rule, wildcards or {})
    try:
        function = stage_function(rule)
        _set_threads(threads)
        function(**arguments(function, named, threads))
    except InputError as error:
        logging.getLogger("stage").error("%s: %s", name, error)
        sys.exit(1)
    except Exception:
        logging.getLogger("stage").exception("%s failed", name)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Run one stage outside Snakemake, as a job would: ``python -m workflow_scripts.stage RULE
    NAME=VALUE ... [--threads N] [--log FILE]``; a name given twice is a list, options are JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("rule", help="a rule of the workflow (stage.STAGES)")
    parser.add_argument(
        "values", nargs="*", metavar="NAME=VALUE", help="its inputs, outputs, params"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", help="where the job's stderr goes (default: here)")
    args = parser.parse_args(argv)
    named: dict[str, object] = {}
    for item in args.values:
        name, _, value = item.partition("=")
        if name in named:
            previous = named[name]
            named[name] = [*(previous if isinstance(previous, list) else [previous]), value]
        else:
            named[name] = value
    run_stage(args.rule, named, args.threads, args.log)


if __name__ == "__main__":
    # the module the stages import, whose InputError they raise, not this __main__ copy of it
    from workflow_scripts import stage

    stage.main()
