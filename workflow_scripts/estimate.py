"""What a config costs, computed from the config alone: rows, stored bytes, FLOPs and GPU hours per
stage, and the memory and run time of each job (the rules' ``resources``).

Sizes come from the study's plan (``workflow_scripts.plan``): a model's read-out count and size
(its family's estimate in ``workflow_scripts.families``: ``arch`` for init: and train: models, the
named architectures, ``blocks`` and ``width`` for hf: and local: ones), a dataset's rows
(``rows``, else ``expected_rows``) and mean tokens per text row (``expected_tokens``, capped at
``max_tokens``). The formulas:

* stored bytes of a (model, dataset) = rows x tokens x read-outs x width x bytes per value;
* forward FLOPs = 2 x parameters per token (transformers; 12 x blocks x width^2 + the embedding),
  or the architecture's FLOPs per image (ResNets); training = 3 x forward over every example
  seen; an ablation sweep = about as many forward passes as there are blocks (head and tail at
  every k, each running about half the model, top-1 and top-5 from the same pass);
* GPU hours = FLOPs / the throughput measured on one H100 (benchmarks/gpu_stages.py), and
  for extraction the shard writer's rate where that is slower, times the GPUs a job holds: a
  model split over several (``device_map``) runs its blocks one GPU after another, so its jobs
  take the time of one GPU and hold all of theirs (``models.<name>.gpus``, else what the weights
  need: ``workflow_scripts.options.placement.gpus_needed``).

Run ``python -m workflow_scripts.estimate configs/full.yaml`` for the table.
"""

from __future__ import annotations

import argparse
import math

from workflow_scripts.options.placement import GPU_HOST_MB, Placement, host_bytes
from workflow_scripts.options.precision import bytes_per_value
from workflow_scripts.plan import Study, resolve

# measured on one H100 (benchmarks/gpu_stages.py, bfloat16 autocast): effective FLOP/s
TRANSFORMER_FLOPS_PER_S = 1.0e14  # GPT-2-medium shape: 1.4e14 forward, 1.05e14 training
RESNET_FLOPS_PER_S = {"forward": 4.4e13, "train": 2.2e13}  # ResNet-50 shape
# the uncompressed shard writer on 2 CPU cores, to the disk (benchmarks/extract_throughput.py:
# 1.9 to 2.1 GiB/s; zstd would be 0.4): a GPU node's disk may be slower
ZARR_BYTES_PER_S = 1.5e9


def _image(study: Study, model: str) -> bool:
    return study.models[model].family.modality == "image"


def tokens_per_row(entry, max_tokens: int) -> int:
    return min(max_tokens, entry.get("expected_tokens", max_tokens))


def extraction(study: Study, model: str, dataset: str) -> dict:
    """Rows, stored bytes, FLOPs and GPU seconds of extracting one (model, dataset)."""
    options, size, image = (
        study.models[model].extract,
        study.models[model].size,
        _image(study, model),
    )
    data = study.datasets[dataset]
    tokens = 1 if image else tokens_per_row(data.entry, options.max_tokens)
    per_example = options.rows_per_example or tokens
    rows = data.estimated_rows * min(per_example, tokens)
    stored = rows * size.readouts * size.width * bytes_per_value(options.dtype)
    flops = data.estimated_rows * tokens * size.flops_per_row
    rate = RESNET_FLOPS_PER_S["forward"] if image else TRANSFORMER_FLOPS_PER_S
    seconds = max(flops / rate, stored / ZARR_BYTES_PER_S)  # the GPU waits for the writer
    gpus = study.models[model].placement.gpus
    return {"rows": rows, "bytes": stored, "flops": flops, "gpu_seconds": seconds, "gpus": gpus}


def ablation(study: Study, model: str, dataset: str) -> dict:
    size, image = study.models[model].size, _image(study, model)
    data = study.datasets[dataset]
    tokens = 1 if image else tokens_per_row(data.entry, study.ablation_options.max_tokens)
    blocks = study.models[model].blocks
    flops = (blocks + 1) * data.estimated_rows * tokens * size.flops_per_row
    rate = RESNET_FLOPS_PER_S["forward"] if image else TRANSFORMER_FLOPS_PER_S
    gpus = study.models[model].placement.gpus
    return {"flops": flops, "gpu_seconds": flops / rate, "gpus": gpus}


def training(study: Study, run: str) -> dict:
    spec, size = study.runs[run].settings, study.models[run].size
    data = study.datasets[spec["dataset"]]
    rows = data.estimated_rows * (1 - spec["eval_fraction"])
    if _image(study, run):
        examples = spec["epochs"] * rows if "epochs" in spec else spec["steps"] * spec["batch_size"]
        flops = 3 * examples * size.flops_per_row
        rate = RESNET_FLOPS_PER_S["train"]
    else:
        if spec["kind"] == "causal_lm":  # every token of the text, in blocks of `context`
            row_tokens = data.entry.get("expected_tokens", spec["context"])
            step_tokens = spec["context"]
        else:  # one truncated pair per example
            row_tokens = step_tokens = tokens_per_row(data.entry, spec["max_tokens"])
        if "epochs" in spec:
            seen = spec["epochs"] * rows * row_tokens
        else:
            seen = spec["steps"] * spec["batch_size"] * step_tokens
        flops = 3 * seen * size.flops_per_row
        rate = TRANSFORMER_FLOPS_PER_S
    return {"flops": flops, "gpu_seconds": flops / rate, "gpus": 1}


def loader_bytes(study: Study, run: str) -> float:
    """What a training job's DataLoader holds, whatever the dataset's size: four batches ahead
    per worker (images as uint8, text as int64 ids) and each worker's cached row groups (about
    14 MB of ImageNet JPEGs or a few MB of text each), for 16 workers."""
    spec = study.runs[run].settings
    if spec["kind"] == "image_classification":
        small = spec.get("arch", {}).get("stem") == "cifar"
        batch = spec["batch_size"] * 3 * (32 * 32 if small else 224 * 224)
        cached = 2 * 14e6
    else:
        batch = spec["batch_size"] * spec.get("context", spec["max_tokens"]) * 8 * 3
        cached = 4 * 4e6
    return 16 * (4 * batch + cached)


def job_resources(study: Study, stage: str, model: str, dataset: str | None = None) -> dict:
    """mem_mb, runtime (minutes) and GPUs of one job: the model in its dtype (training: float32)
    plus what the stage holds, with room to spare; run time from the estimate, at least 10
    minutes, doubled for safety. A model split over devices keeps its weights off the host
    (accelerate puts them on the GPUs; what ``max_memory`` allows the CPU stays), and each of
    its GPUs adds a CUDA context and pinned buffers to the host's memory."""
    placement = study.models[model].placement if stage != "train" else Placement(gpus=1)
    size = study.models[model].size
    dtype = study.models[model].dtype if stage != "train" else "float32"
    model_mb = size.parameters * bytes_per_value(dtype) / 2**20
    if placement.split:
        model_mb = min(model_mb, host_bytes(placement.max_memory) / 2**20)
        model_mb += GPU_HOST_MB * placement.gpus
    if stage == "extract":
        options = study.models[model].extract
        row = size.readouts * size.width
        buffer = (
            options.chunk_rows * options.chunks_per_shard * row * bytes_per_value(options.dtype)
        )
        batch = options.batch_size * (1 if _image(study, model) else options.max_tokens)
        # a batch's streams in the model's dtype, on their way to the host and the writer
        memory = model_mb + (buffer + 3 * batch * row * bytes_per_value(dtype)) / 2**20
        shards = study.datasets[dataset].shards
        seconds = extraction(study, model, dataset)["gpu_seconds"] / shards
    elif stage == "ablate":
        memory = 2 * model_mb
        seconds = ablation(study, model, dataset)["gpu_seconds"]
    else:  # train: weights, gradients, two optimizer moments, and the loader's batches
        memory = 4 * model_mb + 4096 + loader_bytes(study, model) / 2**20
        seconds = training(study, model)["gpu_seconds"]
    return {
        "mem_mb": int(2000 + 1.5 * memory),
        "runtime": max(10, math.ceil(2 * seconds / 60)),
        "gpu": placement.gpus,
    }


def table(study: Study) -> list[dict]:
    """Per stage: jobs, the most GPUs one job holds, stored bytes, FLOPs and GPU hours."""
    extracted = [extraction(study, m, d) for m, d in study.statistics]
    ablated = [ablation(study, m, d) for m, d in study.ablations]
    trained = [training(study, run) for run in study.runs]
    shards = sum(study.datasets[d].shards for _, d in study.statistics)
    rows = []
    for stage, items, jobs in (
        ("train", trained, len(trained)),
        ("extract", extracted, shards),
        ("ablate", ablated, len(ablated)),
    ):
        rows.append(
            {
                "stage": stage,
                "jobs": jobs,
                "stored_gb": sum(i.get("bytes", 0) for i in items) / 1e9,
                "pflops": sum(i["flops"] for i in items) / 1e15,
                "gpus_per_job": max((i["gpus"] for i in items), default=0),
                "gpu_hours": sum(i["gpu_seconds"] * i["gpus"] for i in items) / 3600,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configfile", help="a workflow config, e.g. configs/full.yaml")
    args = parser.parse_args(argv)
    with open(args.configfile) as handle:
        rows = table(resolve(yaml.safe_load(handle)))
    print(
        f"{'stage':<9}{'jobs':>6}{'GPUs/job':>10}{'stored GB':>11}{'PFLOP':>10}{'H100 hours':>12}"
    )
    for row in rows:
        print(
            f"{row['stage']:<9}{row['jobs']:>6}{row['gpus_per_job']:>10}{row['stored_gb']:>11.1f}"
            f"{row['pflops']:>10.1f}{row['gpu_hours']:>12.1f}"
        )
    total = sum(r["gpu_hours"] for r in rows)
    print(f"{'total':<9}{'':>6}{'':>10}{'':>11}{'':>10}{total:>12.1f}")


if __name__ == "__main__":
    main()
