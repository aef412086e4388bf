"""What a config costs, computed from the config alone: rows, stored bytes, FLOPs and GPU hours per
stage, and the memory and run time of each job (the rules' ``resources``).

Sizes come from the config: a model's read-out count and width (``arch`` for init: and train:
models, the torchvision table, ``blocks`` and ``width`` for hf: and local: ones), a dataset's rows
(``rows``, else ``expected_rows``) and mean tokens per text row (``expected_tokens``, capped at
``max_tokens``). The formulas:

* stored bytes of a (model, dataset) = rows x tokens x read-outs x width x bytes per value;
* forward FLOPs = 2 x parameters per token (transformers; 12 x blocks x width^2 + the embedding),
  or the architecture's FLOPs per image (ResNets); training = 3 x forward over every example
  seen; an ablation sweep = about as many forward passes as there are blocks (head and tail at
  every k, each running about half the model, top-1 and top-5 from the same pass);
* GPU hours = FLOPs / the throughput measured on one H100 (benchmarks/gpu_stages.py), and
  for extraction the Zarr writer's rate where that is slower (it compresses on the CPU).

Run ``python -m workflow_scripts.estimate configs/full.yaml`` for the table.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from workflow_scripts.config import analysis_pairs, check_config, extract_options
from workflow_scripts.sources import model_kind, readout_count, source_scheme

# measured on one H100 (benchmarks/gpu_stages.py, bfloat16 autocast): effective FLOP/s
TRANSFORMER_FLOPS_PER_S = 1.0e14   # GPT-2-medium shape: 1.4e14 forward, 1.05e14 training
RESNET_FLOPS_PER_S = {"forward": 4.4e13, "train": 2.2e13}  # ResNet-50 shape
ZARR_BYTES_PER_S = 3.0e8           # the writer (zstd, crc32c on the CPU): 400 MiB a batch in 1.4 s
# forward FLOPs per 224x224 image (2 x multiply-adds) and parameters of torchvision ResNets
TORCHVISION_FLOPS = {"resnet18": 3.6e9, "resnet34": 7.3e9, "resnet50": 8.2e9,
                     "resnet101": 15.7e9, "resnet152": 23.1e9, "wide_resnet50_2": 22.8e9,
                     "wide_resnet101_2": 45.6e9, "resnext50_32x4d": 8.5e9,
                     "resnext101_32x8d": 33.0e9, "resnext101_64x4d": 31.0e9}
TORCHVISION_WIDTH = {"resnet18": 512, "resnet34": 512}  # the others end at 2048 channels
DEFAULT_WIDTH = 1024  # an hf: or local: model that does not state its width
VOCABULARY = 50_257   # embedding rows assumed for a hub transformer


@dataclass
class ModelSize:
    readouts: int
    width: int
    parameters: float
    flops_per_row: float  # forward FLOPs per token (transformers) or per image (ResNets)
    image: bool


def model_size(config: dict, name: str) -> ModelSize:
    """The size of a model from the checked config: its entry, or for a trained model its run's
    architecture (a fine-tune: its base's size)."""
    spec = config["models"][name]
    scheme, rest = source_scheme(spec["source"])
    if scheme == "train":
        run = config["training"]["runs"][rest]
        if "arch" not in run:
            return model_size(config, run["base"])
        spec = {**spec, "arch": run["arch"], "source": "init:"}
        # a language model with another model's tokenizer has a real vocabulary to embed
        scheme = "train" if run.get("tokenizer") else "init"
    readouts = readout_count(spec)
    image = model_kind(spec) == "image"
    arch = spec.get("arch", {})
    if image:
        if scheme == "torchvision":
            width = TORCHVISION_WIDTH.get(rest, 2048)
            flops = TORCHVISION_FLOPS.get(rest, 8.2e9)
        else:
            widths = arch.get("widths", [64, 128, 256, 512])
            width = widths[-1] * (4 if arch.get("block") == "bottleneck" else 1)
            # ResNet-18 (8 basic blocks, widths 64..512) does 3.6 GFLOPs: scale by width^2, depth
            flops = 3.6e9 * (widths[-1] / 512) ** 2 * readouts / 8
            if arch.get("block") == "bottleneck":
                flops *= 8.2 / 7.3  # ResNet-50 against ResNet-34, the same depth per stage
            if arch.get("stem") == "cifar":
                flops /= 12  # 32x32 inputs without the stride-4 stem
        return ModelSize(readouts, width, flops / 2, flops, True)
    width = arch.get("width", spec.get("width", DEFAULT_WIDTH))
    parameters = 12 * (readouts - 1) * width ** 2 + (VOCABULARY * width if scheme != "init" else 0)
    return ModelSize(readouts, width, parameters, 2 * parameters, False)


def dataset_rows(spec: dict) -> int:
    return spec.get("rows") or spec.get("expected_rows") or 1000


def tokens_per_row(spec: dict, max_tokens: int) -> int:
    return min(max_tokens, spec.get("expected_tokens", max_tokens))


def extraction(config: dict, model: str, dataset: str) -> dict:
    """Rows, stored bytes, FLOPs and GPU seconds of extracting one (model, dataset)."""
    options = extract_options(config, model)
    size = model_size(config, model)
    data = config["datasets"][dataset]
    tokens = 1 if size.image else tokens_per_row(data, options["max_tokens"])
    per_example = options.get("rows_per_example") or tokens
    rows = dataset_rows(data) * min(per_example, tokens)
    stored = rows * size.readouts * size.width * (2 if options["dtype"] == "float16" else 4)
    flops = dataset_rows(data) * tokens * size.flops_per_row
    rate = RESNET_FLOPS_PER_S["forward"] if size.image else TRANSFORMER_FLOPS_PER_S
    seconds = max(flops / rate, stored / ZARR_BYTES_PER_S)  # the GPU waits for the writer
    return {"rows": rows, "bytes": stored, "flops": flops, "gpu_seconds": seconds}


def ablation(config: dict, model: str, dataset: str) -> dict:
    size = model_size(config, model)
    data = config["datasets"][dataset]
    tokens = 1 if size.image else tokens_per_row(data, config["ablation"].get("max_tokens", 128))
    blocks = size.readouts - (0 if size.image else 1)
    flops = (blocks + 1) * dataset_rows(data) * tokens * size.flops_per_row
    rate = RESNET_FLOPS_PER_S["forward"] if size.image else TRANSFORMER_FLOPS_PER_S
    return {"flops": flops, "gpu_seconds": flops / rate}


def training(config: dict, run: str) -> dict:
    spec = config["training"]["runs"][run]
    size = model_size(config, run)
    data = config["datasets"][spec["dataset"]]
    rows = dataset_rows(data) * (1 - spec.get("eval_fraction", 0.1))
    if size.image:
        examples = spec["epochs"] * rows if "epochs" in spec else spec["steps"] * spec["batch_size"]
        flops = 3 * examples * size.flops_per_row
        rate = RESNET_FLOPS_PER_S["train"]
    else:
        if spec["kind"] == "causal_lm":  # every token of the text, in blocks of `context`
            row_tokens, step_tokens = data.get("expected_tokens", spec["context"]), spec["context"]
        else:  # one truncated pair per example
            row_tokens = step_tokens = tokens_per_row(data, spec.get("max_tokens", 128))
        if "epochs" in spec:
            seen = spec["epochs"] * rows * row_tokens
        else:
            seen = spec["steps"] * spec["batch_size"] * step_tokens
        flops = 3 * seen * size.flops_per_row
        rate = TRANSFORMER_FLOPS_PER_S
    return {"flops": flops, "gpu_seconds": flops / rate}


def training_data_bytes(config: dict, run: str) -> float:
    """What a training job holds of its dataset: the table, with images still encoded (about
    110 kB a PNG at ImageNet size, 3 kB at 32 x 32), and a language model's tokens as int32."""
    spec = config["training"]["runs"][run]
    data = config["datasets"][spec["dataset"]]
    rows = dataset_rows(data)
    if spec["kind"] == "image_classification":
        small = spec.get("arch", {}).get("stem") == "cifar"
        return rows * (3e3 if small else 1.1e5)
    tokens = rows * data.get("expected_tokens", spec.get("max_tokens", 128))
    return tokens * (4 + 6)  # int32 ids, and the text (about 6 bytes a token) in the table


def job_resources(config: dict, stage: str, model: str, dataset: str | None = None) -> dict:
    """mem_mb and runtime (minutes) of one job: the model in float32 plus what the stage holds,
    with room to spare; run time from the estimate, at least 10 minutes, doubled for safety."""
    size = model_size(config, model)
    model_mb = size.parameters * 4 / 2**20
    if stage == "extract":
        options = extract_options(config, model)
        buffer = (size.readouts * options["chunk_rows"] * options["chunks_per_shard"] *
                  size.width * 4)
        batch = options["batch_size"] * (1 if size.image else options["max_tokens"])
        memory = model_mb + (buffer + 3 * batch * size.readouts * size.width * 4) / 2**20
        seconds = extraction(config, model, dataset)["gpu_seconds"] / config["datasets"][dataset]["shards"]
    elif stage == "ablate":
        memory = 2 * model_mb
        seconds = ablation(config, model, dataset)["gpu_seconds"]
    else:  # train: weights, gradients, two optimizer moments, and the data it holds
        memory = 4 * model_mb + 4096 + training_data_bytes(config, model) / 2**20
        seconds = training(config, model)["gpu_seconds"]
    return {"mem_mb": int(2000 + 1.5 * memory), "runtime": max(10, math.ceil(2 * seconds / 60))}


def table(config: dict) -> list[dict]:
    """Per stage: jobs, stored bytes, FLOPs and GPU hours."""
    pairs = analysis_pairs(config)
    extracted = [extraction(config, m, d) for m, d in pairs]
    ablated = [ablation(config, m, d) for m, d in analysis_pairs(config, config["ablation"]["analyses"])]
    trained = [training(config, run) for run in config["training"]["runs"]]
    rows = []
    for stage, items, jobs in (
            ("train", trained, len(trained)),
            ("extract", extracted, sum(config["datasets"][d]["shards"] for _, d in pairs)),
            ("ablate", ablated, len(ablated))):
        rows.append({"stage": stage, "jobs": jobs,
                     "stored_gb": sum(i.get("bytes", 0) for i in items) / 1e9,
                     "pflops": sum(i["flops"] for i in items) / 1e15,
                     "gpu_hours": sum(i["gpu_seconds"] for i in items) / 3600})
    return rows


def main(argv: list[str] | None = None) -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configfile", help="a workflow config, e.g. configs/full.yaml")
    args = parser.parse_args(argv)
    with open(args.configfile) as handle:
        config = check_config(yaml.safe_load(handle))
    rows = table(config)
    print(f"{'stage':<9}{'jobs':>6}{'stored GB':>11}{'PFLOP':>10}{'H100 hours':>12}")
    for row in rows:
        print(f"{row['stage']:<9}{row['jobs']:>6}{row['stored_gb']:>11.1f}{row['pflops']:>10.1f}"
              f"{row['gpu_hours']:>12.1f}")
    total = sum(r["gpu_hours"] for r in rows)
    print(f"{'total':<9}{'':>6}{'':>11}{'':>10}{total:>12.1f}")


if __name__ == "__main__":
    main()
