"""What splitting a decoder between the CPU and the disk (``models.<name>.device_map``) costs
extraction, on the CPU, against the same model loaded whole.

A random-initialised Llama-shaped decoder (``init:``, family ``decoder``; by default 8 blocks of
width 1024, 16 heads, context 256, intermediate 4096 and the built-in GPT-2-style tokenizer's
small vocabulary: 134.5M parameters, 513 MB in float32, nearly all of it in the blocks) is
stored with the project's fetch, and the stream of ``--rows`` examples of the built-in
``corpus`` dataset through it is extracted with ``workflow_scripts.extract.extract`` (the
schema's default extraction options on the CPU, float16 storage), each case in a fresh
interpreter:

  * ``whole``: the model loaded whole (the default placement). transformers maps the
    safetensors file and, the dtypes being equal, keeps its weights there: they are read into
    memory (file-backed pages) on the first forward;
  * ``split``: ``Placement(device_map="auto", max_memory={"cpu": --cpu-cap x W})``, W the
    weight bytes (default a quarter). accelerate puts on the CPU what fits the cap, less room
    it keeps for running the offloaded blocks (at a quarter of this model, only the
    embeddings: every block goes to the disk; ``--cpu-cap 0.5`` keeps 3 of 8 blocks), and
    offloads the rest to the disk: left in the checkpoint's safetensors file, read from it block
    by block as each runs, then dropped. So host memory should hold about the CPU share plus
    one block, and every batch reads the offloaded blocks again. The device map accelerate
    chose is reported (modules and weight bytes on ``cpu`` and on ``disk``);
  * ``split_mmap``: the same, under ``MALLOC_MMAP_THRESHOLD_=1048576`` (glibc's malloc: every
    allocation of 1 MiB or more is its own mapping, returned to the system when freed). By
    default glibc raises that threshold to the size of the largest mapped allocation freed (up
    to 32 MiB), after which the weights read for each offloaded block come from the heap, which
    freeing them does not shrink: the split run's memory then grows batch after batch, towards
    the whole model's. This case shows what the split holds when freed weights are given back.

Each child runs under GNU time (``/usr/bin/time -f %M``): its own peak RSS. It also samples
``/proc/self/status`` every 20 ms for the peaks of its anonymous memory (``RssAnon``: weights
read into memory, activations, buffers) and of its file-backed pages (``RssFile``: the
libraries and the safetensors pages it maps), and records its peak RSS after importing the
stage's code, before loading the model (the floor: torch and transformers alone). Time: the
``extract`` call itself (the model's loading included), split into the loading
(``load_adapter``) and the rest (tokenizing, the forward passes, writing). The stored streams of
the split runs must equal the whole run's bit for bit, on every read-out point (numpy
``array_equal``; and the row ids, positions and padding flags). There is no device memory on a
CPU: the device column says so (the children hide any GPU: the host is what is measured).

What the result means: ``split_time_over_whole`` is the price of the offload (every batch reads
the offloaded blocks again: from the page cache here, the file being small and just written;
from the disk for a model larger than memory; and accelerate's hooks move each into place);
``split_rss_over_whole`` well under 1 is its point (a model larger than the host's memory still
runs); ``split_mmap_rss_over_whole`` says how much of the split run's peak is freed weights the
allocator kept.

Run from the repository root (about 3 minutes on 2 cores shared with another test suite):

    .venv/bin/python benchmarks/model_placement.py
    .venv/bin/python benchmarks/model_placement.py --layers 4 --width 512 --rows 32  # quick
    .venv/bin/python benchmarks/model_placement.py --cpu-cap 0.5   # some blocks on the CPU
    .venv/bin/python benchmarks/model_placement.py --repeats 2     # interleaved, steadier

The last line is JSON: the split runs' extract time and peak RSS as ratios to the whole run's
(fastest time, median peak over ``--repeats``), whether every stream equals the whole run's, the
parameter count and the weights' size in MB (2**20 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TIME = "/usr/bin/time"  # GNU time (Debian's package ``time``): a child's own peak RSS
CASES = ("whole", "split", "split_mmap")
SPLIT = {"split", "split_mmap"}
ALLOCATOR = {"split_mmap": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}  # a case's own environment
MB = 2**20


# --- the children ---


def extract_options():
    """The schema's default extraction options, on the CPU, float16 storage."""
    from workflow_scripts.config import load_schema
    from workflow_scripts.options.extract import ExtractOptions

    parts = load_schema()["definitions"]["extract"]["allOf"]
    defaults = {k: v["default"] for k, v in parts[1]["properties"].items()}
    return ExtractOptions(**{**defaults, "device": "cpu", "dtype": "float16"})


def split_placement(weight_bytes: int, cpu_cap: float):
    from workflow_scripts.options.placement import Placement

    return Placement(device_map="auto", max_memory={"cpu": int(weight_bytes * cpu_cap)})


def import_floor() -> None:
    """What every case imports before it loads a model (transformers imports the Llama code
    lazily, in seconds that are not the model's loading)."""
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import workflow_scripts.extract  # noqa: F401
    import workflow_scripts.models.hf_decoder  # noqa: F401


class MemorySampler:
    """This process's peak ``RssAnon`` and ``RssFile``, sampled every ``interval`` seconds by a
    thread (and once more on ``stop``)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, {"RssAnon": 0, "RssFile": 0}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def status() -> dict[str, int]:
        """``/proc/self/status``'s memory lines, in bytes."""
        values = {}
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if value.strip().endswith("kB"):
                    values[key] = int(value.split()[0]) * 1024
        return values

    def sample(self) -> None:
        now = self.status()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], now[key])

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> dict:
        self._done.set()
        self._thread.join()
        self.sample()
        return self.peak


def build(work: Path, args) -> dict:
    """Store the decoder and the dataset; the parameter count, the weight bytes and where the
    split placement puts the model."""
    import contextlib
    import io

    from workflow_scripts.data import builtin, store
    from workflow_scripts.fetch_model import fetch
    from workflow_scripts.models import load_adapter
    from workflow_scripts.models.hf_decoder import layout

    spec = {
        "family": "decoder",
        "source": "init:",
        "arch": {
            "type": "llama",
            "layers": args.layers,
            "width": args.width,
            "heads": args.heads,
            "context": 256,
        },
        "seed": 0,
    }
    with contextlib.redirect_stderr(io.StringIO()):
        manifest = fetch(spec, work / "decoder")
    corpus = builtin.generate("corpus", args.rows, seed=0)
    store.write(corpus, work / "corpus.parquet", "text", None)

    def size(parameters) -> int:
        return sum(p.numel() * p.element_size() for p in parameters)

    whole, _ = load_adapter(work / "decoder")
    parameters = sum(p.numel() for p in whole.model.parameters())
    weight_bytes = size(whole.model.parameters())
    block_bytes = size(layout(whole.model)[1][0].parameters())
    assert parameters == manifest["parameters"], (parameters, manifest["parameters"])
    del whole
    split, _ = load_adapter(work / "decoder", placement=split_placement(weight_bytes, args.cpu_cap))
    modules: dict[str, int] = {}
    for device in split.model.hf_device_map.values():
        modules[str(device)] = modules.get(str(device), 0) + 1
    blocks = layout(split.model)[1]
    return {
        "parameters": parameters,
        "weight_bytes": weight_bytes,
        "block_bytes": block_bytes,
        "blocks": len(blocks),
        "file_bytes": sum(f.stat().st_size for f in (work / "decoder").glob("*.safetensors")),
        "modules": modules,
        "disk_bytes": size(p for p in split.model.parameters() if p.device.type == "meta"),
        "disk_blocks": sum(all(p.device.type == "meta" for p in b.parameters()) for b in blocks),
    }


def run_case(case: str, work: Path, args) -> dict:
    """Extract the stream of ``case`` into ``work/<case>.zarr``: its times, its peak RSS before
    the model loads (the floor) and its sampled memory peaks."""
    sampler = MemorySampler()
    import_floor()  # before the clock: the extract call loads and runs the model
    import torch

    from workflow_scripts import extract as extraction

    floor = MemorySampler.status()["VmHWM"]
    torch.set_num_threads(args.threads)
    built = json.loads((work / "build.json").read_text())
    placement = None
    if case in SPLIT:
        placement = split_placement(built["weight_bytes"], args.cpu_cap)
    loading = []
    load_adapter = extraction.load_adapter

    def timed_load(*a, **k):  # the extract call's loading of the model, timed apart
        start = time.perf_counter()
        try:
            return load_adapter(*a, **k)
        finally:
            loading.append(time.perf_counter() - start)

    extraction.load_adapter = timed_load
    out = work / f"{case}.zarr"
    shutil.rmtree(out, ignore_errors=True)  # an earlier repetition's
    model, data, options = work / "decoder", work / "corpus.parquet", extract_options()
    start = time.perf_counter()
    extraction.extract(model, data, 0, 1, out, options, placement=placement)
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    return {
        "extract_s": seconds,
        "load_s": loading[0],
        "floor": floor,
        "anon": peak["RssAnon"],
        "file": peak["RssFile"],
    }


def child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("build", *CASES))
    parser.add_argument("work", type=Path)
    for name in ("layers", "width", "heads", "rows", "threads"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--cpu-cap", type=float)
    args = parser.parse_args(argv)
    if args.what == "build":
        result = build(args.work, args)
    else:
        result = run_case(args.what, args.work, args)
    (args.work / f"{args.what}.json").write_text(json.dumps(result))


# --- the parent: runs the children and compares ---


def child(what: str, work: Path, args) -> tuple[float, int, dict]:
    """Run this script's child ``what`` under ``/usr/bin/time``: its wall time, its own peak RSS
    in bytes and what it reported. GPUs are hidden: the host is what is measured."""
    command = [sys.executable, __file__, "--child", what, str(work)]
    command += [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in ("layers", "width", "heads", "rows", "threads", "cpu_cap")
    ]
    usage, log = work / f"{what}.rss", work / f"{what}.log"
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **ALLOCATOR.get(what, {})}
    with open(log, "w") as out:
        start = time.perf_counter()
        process = subprocess.run(
            [TIME, "-f", "%M", "-o", str(usage), *command],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"child {what} failed:\n{log.read_text()[-3000:]}")
    rss = int(usage.read_text().split()[-1]) * 1024  # %M: KiB
    return seconds, rss, json.loads((work / f"{what}.json").read_text())


def streams_equal(work: Path, case: str) -> tuple[bool, int, int]:
    """Whether ``case`` stored the whole run's stream exactly: every read-out point, the row
    ids, positions and padding flags; and the read-out points and rows compared."""
    import numpy as np

    from workflow_scripts.activations import layer_name, open_shard

    whole, split = open_shard(work / "whole.zarr"), open_shard(work / f"{case}.zarr")
    readouts = len(whole.attrs["readouts"])
    equal = whole.attrs["readouts"] == split.attrs["readouts"]
    for k in range(readouts):
        expected = whole[layer_name(k)][:]
        equal &= bool(np.abs(expected.astype(np.float32)).max() > 0)  # a stream, not zeros
        equal &= np.array_equal(split[layer_name(k)][:], expected)
    for column in ("example_id", "position", "is_padding"):
        equal &= np.array_equal(split[column][:], whole[column][:])
    return bool(equal), readouts, int(whole[layer_name(0)].shape[0])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder blocks (default 8)")
    parser.add_argument("--width", type=int, default=1024, help="hidden width (default 1024)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads (default 16)")
    parser.add_argument("--rows", type=int, default=48, help="corpus examples (default 48)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--cpu-cap",
        type=float,
        default=0.25,
        help="the split runs' max_memory on the CPU, a fraction of the weight bytes (0.25)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="interleaved runs of each case (default 1)"
    )
    args = parser.parse_args(argv)
    if not os.access(TIME, os.X_OK):
        parser.error(
            f"{TIME} (GNU time) is needed for the children's peak RSS: apt-get install time"
        )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="model-placement-") as tmp:
        work = Path(tmp)
        seconds, _, built = child("build", work, args)
        weight_mb = built["weight_bytes"] / MB
        cpu_mb = (built["weight_bytes"] - built["disk_bytes"]) / MB
        print(
            f"decoder: llama, {args.layers} blocks x width {args.width}, {args.heads} heads: "
            f"{built['parameters']:,} parameters, {weight_mb:.0f} MB of float32 weights "
            f"({built['block_bytes'] / MB:.0f} MB per block; safetensors file "
            f"{built['file_bytes'] / MB:.0f} MB); stored in {seconds:.0f} s"
        )
        modules = built["modules"]
        print(
            f"split: max_memory cpu {built['weight_bytes'] * args.cpu_cap / MB:.0f} MB "
            f"({args.cpu_cap:g} of the weights); accelerate's map: {modules.get('cpu', 0)} "
            f"modules on cpu ({cpu_mb:.1f} MB, {built['blocks'] - built['disk_blocks']} of "
            f"{built['blocks']} blocks), {modules.get('disk', 0)} on disk "
            f"({built['disk_bytes'] / MB:.1f} MB, {built['disk_blocks']} blocks)"
        )
        print(
            f"data: {args.rows} examples of the built-in corpus; the default extraction options "
            f"on the CPU (float16 storage), {args.threads} torch threads"
        )
        results = {case: [] for case in CASES}
        for r in range(args.repeats):
            order = CASES[r % len(CASES) :] + CASES[: r % len(CASES)]
            for case in order:
                _, rss, found = child(case, work, args)
                results[case].append({**found, "rss": rss})
                print(
                    f"  run {r + 1}/{args.repeats} {case}: extract {found['extract_s']:.1f} s "
                    f"(load {found['load_s']:.1f} s), peak RSS {rss / MB:.0f} MB"
                )
        compared = {case: streams_equal(work, case) for case in CASES if case in SPLIT}
        _, readouts, rows = compared["split"]
        best = {c: min(results[c], key=lambda x: x["extract_s"]) for c in CASES}
        median = {
            key: {c: statistics.median(x[key] for x in results[c]) for c in CASES}
            for key in ("rss", "floor", "anon", "file")
        }
        print(
            f"\n{rows} rows (token positions, padding included) x {readouts} read-out points; "
            "floor: the child's peak RSS after its imports, before the model loads"
        )
        print(
            f"{'':11}{'extract s':>10}{'load s':>8}{'rest s':>8}{'peak RSS MB':>13}"
            f"{'floor MB':>10}{'above':>7}{'anon MB':>9}{'file MB':>9}  device memory"
        )
        for c in CASES:
            b, m = best[c], {key: values[c] / MB for key, values in median.items()}
            print(
                f"{c:<11}{b['extract_s']:>10.1f}{b['load_s']:>8.1f}"
                f"{b['extract_s'] - b['load_s']:>8.1f}{m['rss']:>13.0f}{m['floor']:>10.0f}"
                f"{m['rss'] - m['floor']:>7.0f}{m['anon']:>9.0f}{m['file']:>9.0f}"
                "  n/a (no GPU)"
            )
        print(
            f"(anon, file: sampled peaks of RssAnon and RssFile. What the split should hold "
            f"above the floor: {cpu_mb:.0f} MB on the CPU + one block "
            f"{built['block_bytes'] / MB:.0f} MB + activations)"
        )
        ratios = {}
        for c in ("split", "split_mmap"):
            ratios[f"{c}_time_over_whole"] = best[c]["extract_s"] / best["whole"]["extract_s"]
            ratios[f"{c}_rss_over_whole"] = median["rss"][c] / median["rss"]["whole"]
            above = (median["rss"][c] - median["floor"][c]) / (
                median["rss"]["whole"] - median["floor"]["whole"]
            )
            print(
                f"{c} / whole: extract time {ratios[f'{c}_time_over_whole']:.2f}, peak RSS "
                f"{ratios[f'{c}_rss_over_whole']:.2f} (above the floor {above:.2f}); "
                f"stream equal to the whole run's: {compared[c][0]}"
            )
    print(f"total {time.perf_counter() - started:.0f} s")
    summary = {
        "split_time_over_whole": round(ratios["split_time_over_whole"], 3),
        "split_rss_over_whole": round(ratios["split_rss_over_whole"], 3),
        "streams_equal": all(equal for equal, _, _ in compared.values()),
        "parameters": built["parameters"],
        "weight_mb": round(weight_mb, 1),
        "split_mmap_time_over_whole": round(ratios["split_mmap_time_over_whole"], 3),
        "split_mmap_rss_over_whole": round(ratios["split_mmap_rss_over_whole"], 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
