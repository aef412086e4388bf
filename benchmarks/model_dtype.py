"""What running the model in bfloat16 (``models.<name>.dtype``) costs and changes, on the CPU.

1. Time and peak memory of the extract stage for a ~100M-parameter decoder. A random-initialised
   Llama-shaped decoder (hidden 768, 12 layers, 12 heads, intermediate 2560, untied embeddings,
   the vocabulary of the built-in GPT-2-style tokenizer: 99,316,992 parameters; with the more
   usual intermediate 2048 it would be 85.2M, and the extraction's forward never reads the
   unembedding or unused vocabulary rows, so the MLP is widened rather than the vocabulary)
   is saved with ``save_pretrained`` and stored with the project's fetch (family ``decoder``,
   ``local:``), once from a float32 checkpoint and once from a bfloat16 one. The extract stage
   runs as its job runs it (``python -m workflow_scripts.stage extract ... --threads 2``, the
   default extraction options on the CPU, float16 storage) on N examples of the built-in corpus
   (one batch), three ways, interleaved (the order rotating each repetition):

   * ``f32``:           the float32 checkpoint, ``dtype=float32`` (the default);
   * ``bf16``:          the float32 checkpoint, ``dtype=bfloat16`` (cast when loaded);
   * ``bf16_ckpt``:     the bfloat16 checkpoint, ``dtype=bfloat16`` (as most checkpoints are).

   Each child runs under GNU time (``/usr/bin/time -f %M``): its own peak RSS.
   Time: the child's wall time (interpreter, imports, loading the model, extraction), and the
   extraction loop alone (from the stage's progress bar: one batch, so its seconds per batch).
   Reported: rows/s (stored token positions, padding included: what the forward runs), the
   peak RSS (and, roughly, the part of it above the peak of a child that only imports the
   stage and the Llama code), and the ratios to float32 (fastest time of each, median peak).

2. How far bfloat16 moves the statistics, on the default workflow's trained small model: the
   ``gptr2-nano-adam`` run of config.yaml (the settings of ``plan.resolve(config).runs``, every
   default filled in) is trained with the train stage (on ``corpus-train`` tokenized by the
   built-in gpt2-style tokenizer, as the workflow does), and its stream on the ``corpus`` dataset
   (500 rows, 2 shards) is extracted four ways (model dtype + storage dtype ``extract.dtype``):
   float32 + float32 (the reference), bfloat16 + float32 (the forward's effect), float32 +
   bfloat16, float32 + float16 (the default storage). Every read-out point's statistics come from
   the layer_stats stage (the plan's stats options, the model's thresholds) and merge_stats; for
   each metric and setting (top-feature records left out) the largest absolute and relative
   difference over layers against the reference is printed. The extract, layer_stats and
   merge_stats stages of part 2 run in this process through the stage layer's own argument
   conversion (``stage.arguments``), saving two dozen interpreter start-ups; prepare_data,
   tokenize and train run as subprocesses.

The last line is JSON: the parameter count and the bfloat16/float32 ratios of part 1 (whole
stage time, loop rows/s and peak RSS, for ``bf16`` and ``bf16_ckpt``) and, per case of part 2,
the largest relative shift of each metric over its layers and settings.

Run from the repository root (about 4 minutes on 2 cores; CPUs without native bfloat16
arithmetic, such as AVX2-only ones, run the bfloat16 forward several times slower):

    .venv/bin/python benchmarks/model_dtype.py
    .venv/bin/python benchmarks/model_dtype.py --examples 16 --repeats 3   # longer, steadier
    .venv/bin/python benchmarks/model_dtype.py --only time                  # part 1 only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts import plan, stage  # noqa: E402

THREADS = 2
TIME = "/usr/bin/time"  # GNU time (Debian's package ``time``): a child's own peak RSS
RUN = "gptr2-nano-adam"  # the default config's run trained here
ANALYSIS = "corpus"  # and the dataset its statistics are computed on
LLAMA = {  # the ~100M decoder of part 1
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "intermediate_size": 2560,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
SIDES = ("f32", "bf16", "bf16_ckpt")
# part 2: (model dtype, storage dtype); the first is the reference
CASES = {
    "reference": ("float32", "float32"),
    "model_bf16": ("bfloat16", "float32"),
    "store_bf16": ("float32", "bfloat16"),
    "store_f16": ("float32", "float16"),
}


def config_plan():
    return plan.resolve(yaml.safe_load((REPO / "config.yaml").read_text()))


def extract_options(study, **changes) -> dict:
    """The default workflow's extraction options (its models' own), on the CPU."""
    options = dataclasses.asdict(study.models[RUN].extract)
    return {**options, "device": "cpu", **changes}


def child(command: list[str], log: Path) -> tuple[float, int, str]:
    """Run ``command`` with stdout and stderr to ``log``, under ``/usr/bin/time``: its wall time,
    its own peak RSS in bytes, and what it wrote. (Not ``os.wait4`` from here: Linux carries a
    forked child's peak RSS over its exec, so a child of this process, which holds a model,
    would start from this process's peak.)"""
    usage = log.with_suffix(".rss")
    with open(log, "w") as out:
        start = time.perf_counter()
        process = subprocess.run(
            [TIME, "-f", "%M", "-o", str(usage), *command],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        seconds = time.perf_counter() - start
    text = log.read_text()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{text[-3000:]}")
    return seconds, int(usage.read_text().split()[-1]) * 1024, text  # %M: KiB


def stage_command(rule: str, threads: int = 1, **named) -> list[str]:
    values = [f"{name}={value}" for name, value in named.items()]
    return [sys.executable, "-m", "workflow_scripts.stage", rule, *values, f"--threads={threads}"]


def loop_seconds(text: str) -> float | None:
    """The extraction loop's seconds, from the stage's progress bar (one batch: its rate)."""
    found = re.findall(
        r"extract shard \d+: 100%.*?(\d+)/(\d+) \[[^,]*,\s*([\d.]+)(s/batch|batch/s)", text
    )
    if not found:
        return None
    done, _, rate, unit = found[-1]
    per_batch = float(rate) if unit == "s/batch" else 1 / float(rate)
    return int(done) * per_batch


# --- part 1: time and memory ---


def build_decoder(work: Path) -> dict[str, Path]:
    """The ~100M Llama-shaped decoder, stored by fetch from a float32 and a bfloat16
    save_pretrained folder; and the parameter count."""
    import torch
    import transformers

    from workflow_scripts.fetch_model import fetch
    from workflow_scripts.models.builtin_tokenizer import builtin_tokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tokenizer = builtin_tokenizer("gpt2")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), **LLAMA)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    parameters = sum(p.numel() for p in model.parameters())
    dirs = {}
    for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        plain = work / f"plain-{name}"
        model.to(dtype).save_pretrained(plain)
        tokenizer.save_pretrained(plain)
        dirs[name] = work / f"llama-{name}"
        with contextlib.redirect_stderr(io.StringIO()):
            manifest = fetch(
                {"family": "decoder", "source": f"local:{plain}", "blocks": 12}, dirs[name]
            )
        assert manifest["parameters"] == parameters, manifest["parameters"]
        weights = sum(f.stat().st_size for f in dirs[name].glob("*.safetensors"))
        print(f"  stored {name} checkpoint: {weights / 2**20:.0f} MiB of weights")
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    embeddings = model.model.embed_tokens.weight.numel()
    print(
        f"  Llama decoder: {parameters:,} parameters ({per_block:,} per block x 12, "
        f"embeddings {embeddings:,}, unembedding {model.lm_head.weight.numel():,}, "
        f"vocabulary {len(tokenizer)})"
    )
    del model
    return {"parameters": parameters, **dirs}


def time_and_memory(work: Path, study, examples: int, repeats: int) -> dict:
    from workflow_scripts.data import builtin, store

    print("\n== part 1: extraction of a ~100M decoder, float32 against bfloat16")
    built = build_decoder(work)
    data = work / "corpus-time.parquet"
    store.write(builtin.generate("corpus", examples, seed=0), data, "text", None)
    options = extract_options(study, batch_size=max(32, examples))  # one batch
    print(f"  {examples} corpus examples in one batch; extraction options {json.dumps(options)}")
    runs = {
        "f32": (built["f32"], "float32"),
        "bf16": (built["f32"], "bfloat16"),
        "bf16_ckpt": (built["bf16"], "bfloat16"),
    }
    floor_command = [
        sys.executable,
        "-c",
        "import torch, transformers, transformers.models.llama.modeling_llama, "
        "workflow_scripts.extract, workflow_scripts.models.hf_decoder",
    ]
    _, floor, _ = child(floor_command, work / "floor.log")
    wall = {s: [] for s in SIDES}
    loop = {s: [] for s in SIDES}
    peak = {s: [] for s in SIDES}
    rows = None
    for r in range(repeats):
        order = SIDES[r % 3 :] + SIDES[: r % 3]
        for side in order:
            model, dtype = runs[side]
            out = work / f"time-{side}.zarr"
            seconds, rss, text = child(
                stage_command(
                    "extract",
                    THREADS,
                    model=model,
                    data=data,
                    shard=0,
                    shards=1,
                    options=json.dumps(options),
                    out=out,
                    dtype=dtype,
                ),
                work / f"time-{side}.log",
            )
            found = re.search(r"wrote .*: (\d+) rows x (\d+) read-outs", text)
            rows = int(found.group(1))
            wall[side].append(seconds)
            loop[side].append(loop_seconds(text) or seconds)
            peak[side].append(rss)
            subprocess.run(["rm", "-rf", str(out)], check=True)
        print(
            f"  repetition {r + 1}/{repeats}: "
            + ", ".join(
                f"{s} {wall[s][-1]:.1f} s (loop {loop[s][-1]:.1f} s, "
                f"peak {peak[s][-1] / 2**20:.0f} MiB)"
                for s in order
            )
        )
    best_wall = {s: min(v) for s, v in wall.items()}
    best_loop = {s: min(v) for s, v in loop.items()}
    median_peak = {s: statistics.median(v) for s, v in peak.items()}
    print(
        f"\n  {rows} rows (token positions, padding included) x 13 read-outs; floor: a child "
        f"importing the stage and the Llama modelling code peaks at {floor / 2**20:.0f} MiB "
        "(its import-time transients are reused later, so 'above floor' is a rough share)"
    )
    print(
        f"  {'':<11}{'stage s':>9}{'loop s':>8}{'rows/s':>8}{'peak MiB':>10}"
        f"{'above floor':>13}   (best time, median peak)"
    )
    for s in SIDES:
        print(
            f"  {s:<11}{best_wall[s]:>9.1f}{best_loop[s]:>8.1f}{rows / best_loop[s]:>8.1f}"
            f"{median_peak[s] / 2**20:>10.0f}{(median_peak[s] - floor) / 2**20:>13.0f}"
        )
    ratios = {}
    for s in ("bf16", "bf16_ckpt"):
        ratios[f"{s}_over_f32_stage_time"] = best_wall[s] / best_wall["f32"]
        ratios[f"{s}_over_f32_rows_per_s"] = best_loop["f32"] / best_loop[s]
        ratios[f"{s}_over_f32_peak_rss"] = median_peak[s] / median_peak["f32"]
    print("  ratios to float32: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    return {
        "parameters": built["parameters"],
        "rows": rows,
        "rows_per_s": {s: rows / best_loop[s] for s in SIDES},
        "peak_rss_mib": {s: median_peak[s] / 2**20 for s in SIDES},
        "ratios": ratios,
    }


# --- part 2: the statistics ---


def in_process(rule: str, threads: int = THREADS, **named) -> None:
    """One stage, run in this process as the stage layer runs it (its arguments converted from
    the job's strings), its progress bars silenced."""
    function = stage.stage_function(rule)
    with contextlib.redirect_stderr(io.StringIO()):
        function(**stage.arguments(function, named, threads))


def train_model(work: Path, study) -> Path:
    """The default config's ``gptr2-nano-adam``, trained by the train stage on its token file."""
    run = study.runs[RUN]
    train_data = study.datasets[run.dataset]
    prepared = work / f"{run.dataset}.parquet"
    tokens = work / f"{run.token_file_tokenizer}.npy"
    model = work / RUN
    start = time.perf_counter()
    child(
        stage_command(
            "prepare_data",
            spec=plan.as_json(train_data.prepare_spec()),
            name=run.dataset,
            out=prepared,
        ),
        work / "prepare-train.log",
    )
    child(
        stage_command(
            "tokenize",
            data=prepared,
            model="",
            builtin=run.token_file_tokenizer.removeprefix("builtin-"),
            out=tokens,
        ),
        work / "tokenize.log",
    )
    seconds, _, text = child(
        stage_command(
            "train",
            THREADS,
            model=RUN,
            spec=plan.as_json(run.settings),
            data=tokens,
            base="",
            tokenizer="",
            checkpoint=work / "checkpoint.pt",
            metrics=work / "metrics.parquet",
            plot=work / "loss.png",
            out=model,
        ),
        work / "train.log",
    )
    final = re.search(r"final loss ([\d.]+), held-out accuracy ([\d.]+)", text)
    print(
        f"  trained {RUN} ({run.settings['steps']} steps, arch {dict(run.settings['arch'])}) "
        f"in {seconds:.0f} s (with data {time.perf_counter() - start:.0f} s): final loss "
        f"{final.group(1)}, held-out accuracy {final.group(2)}"
    )
    return model


def statistics_of(work: Path, study, model: Path, data: Path, case: str) -> pd.DataFrame:
    """The merged statistics of ``model``'s stream on ``data``, run and stored as ``case`` says."""
    model_dtype, storage = CASES[case]
    shards = study.datasets[ANALYSIS].shards
    paths = [work / case / f"shard-{k}.zarr" for k in range(shards)]
    options = json.dumps(extract_options(study, dtype=storage))
    for k, path in enumerate(paths):
        in_process(
            "extract",
            model=str(model),
            data=str(data),
            shard=str(k),
            shards=str(shards),
            options=options,
            out=str(path),
            readouts=str(study.models[RUN].readouts),
            dtype=model_dtype,
        )
    layers = []
    for layer in range(study.models[RUN].readouts):
        layers.append(str(work / case / f"layer-{layer}.parquet"))
        in_process(
            "layer_stats",
            1,
            shards=[str(p) for p in paths],
            layer=str(layer),
            thresholds=[str(t) for t in study.models[RUN].thresholds],
            options=plan.as_json(study.stats_options),
            model=RUN,
            dataset=ANALYSIS,
            out=layers[-1],
        )
    merged = work / case / "stats.parquet"
    in_process("merge_stats", layers=layers, out=str(merged))
    return pd.read_parquet(merged)


def shifts(reference: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Per metric and setting: the largest absolute and relative difference over layers (the
    top features compared rank by rank, their ranks in one row)."""
    key = ["layer", "metric", "setting"]
    a = reference.set_index(key)["value"]
    b = other.set_index(key)["value"]
    frame = pd.DataFrame({"reference": a, "value": b}).dropna(how="all").reset_index()
    frame["absolute"] = (frame["value"] - frame["reference"]).abs()
    frame["relative"] = frame["absolute"] / frame["reference"].abs()
    frame.loc[frame["absolute"] == 0, "relative"] = 0.0  # 0 against 0 is no shift
    top = frame["metric"] == "top_feature_max_abs"
    frame.loc[top, "setting"] = f"ranks 1-{top.sum() // frame['layer'].nunique()}"
    grouped = frame.groupby(["metric", "setting"], sort=False)
    return grouped.agg(
        reference=("reference", lambda v: v.abs().max()),
        absolute=("absolute", "max"),
        relative=("relative", "max"),
    ).reset_index()


def feature_changes(reference: pd.DataFrame, other: pd.DataFrame, width: int) -> str:
    """Whether the outlier counts (features past a threshold) and the top features' indices
    agree with the reference's, over the layers."""
    counts = [
        f[f["metric"] == "outlier_fraction"].set_index(["layer", "setting"])["value"] * width
        for f in (reference, other)
    ]
    changed = (counts[0].round() != counts[1].round()).sum()
    tops = [
        f[f["metric"] == "top_feature_max_abs"].set_index(["layer", "setting"])["feature"]
        for f in (reference, other)
    ]
    moved = (tops[0] != tops[1]).groupby(level="layer").any().sum()
    return (
        f"outlier counts ({int(counts[0].max())} of {width} features at most) differ in "
        f"{changed} of {len(counts[0])} (layer, threshold) records; top features' order "
        f"differs in {moved} of {reference['layer'].nunique()} layers"
    )


def statistic_shifts(work: Path, study) -> dict:
    print(f"\n== part 2: how far bfloat16 moves the statistics of {RUN} on {ANALYSIS}")
    model = train_model(work, study)
    data = work / f"{ANALYSIS}.parquet"
    in_process(
        "prepare_data",
        spec=plan.as_json(study.datasets[ANALYSIS].prepare_spec()),
        name=ANALYSIS,
        out=str(data),
    )
    print(
        f"  stats options {plan.as_json(study.stats_options)}, thresholds "
        f"{list(study.models[RUN].thresholds)}, {study.datasets[ANALYSIS].shards} shards"
    )
    frames, skipped = {}, {}
    for case, (model_dtype, storage) in CASES.items():
        start = time.perf_counter()
        try:
            frames[case] = statistics_of(work, study, model, data, case)
        except (TypeError, ValueError) as error:  # a storage dtype this checkout refuses
            if storage != "bfloat16":
                raise
            skipped[case] = f"{type(error).__name__}: {error}"
            print(f"  {case}: extract.dtype {storage} refused, skipped ({skipped[case]})")
            continue
        print(
            f"  {case}: model {model_dtype}, stored {storage}: {time.perf_counter() - start:.1f} s"
        )
    reference = frames.pop("reference")
    width = study.models[RUN].size.width
    print(
        f"  metrics in the statistics file: {', '.join(dict.fromkeys(reference['metric']))}; "
        f"{reference['layer'].nunique()} layers, {int(reference['rows'].max())} rows each "
        "(rotated_kurtosis_sd is NaN with one rotation)"
    )
    table = None
    for case, frame in frames.items():
        part = shifts(reference, frame).rename(
            columns={"absolute": f"{case} abs", "relative": f"{case} rel"}
        )
        table = part if table is None else table.merge(part, on=["metric", "setting", "reference"])
    print(
        "\n  largest difference over layers against the reference (model float32, stored "
        "float32);\n  'reference': the largest |value| of the reference over layers\n"
    )
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(
            table.to_string(
                index=False,
                float_format=lambda v: f"{v:.3g}",
                na_rep="",
            )
        )
    print()
    for case, frame in frames.items():
        print(f"  {case}: {feature_changes(reference, frame, width)}")
    result = {
        case: table.groupby("metric", sort=False)[f"{case} rel"].max().to_dict() for case in frames
    }
    return {"shifts": result, "skipped": skipped}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--examples", type=int, default=16, help="corpus examples extracted in part 1 (default 16)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="interleaved repetitions of part 1 (default 2)"
    )
    parser.add_argument("--only", choices=["time", "stats"], help="run one part only")
    args = parser.parse_args(argv)
    if not os.access(TIME, os.X_OK):
        parser.error(
            f"{TIME} (GNU time) is needed for the children's peak RSS: apt-get install time"
        )
    import torch

    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, {THREADS} threads, {os.cpu_count()} CPUs")
    study = config_plan()
    started = time.perf_counter()
    summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="model-dtype-") as tmp:
        work = Path(tmp)
        if args.only in (None, "time"):
            timing = time_and_memory(work, study, args.examples, args.repeats)
            summary["parameters"] = timing["parameters"]
            summary.update({k: round(v, 3) for k, v in timing["ratios"].items()})
        if args.only in (None, "stats"):
            shifted = statistic_shifts(work, study)
            summary["max_relative_shift"] = {
                case: {k: float(f"{v:.3g}") for k, v in values.items()}
                for case, values in shifted["shifts"].items()
            }
            if shifted["skipped"]:
                summary["skipped"] = list(shifted["skipped"])
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
