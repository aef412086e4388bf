"""The dress rehearsal (workflow_scripts/rehearsal): stand-ins under the real names resolve
offline as the real sources do on a cluster (the model type, head and tokenizer kind the record
gives, the datasets' columns and label names, torchvision's weight files, an ImageNet-shaped
folder); the shrunk config keeps every name and is valid; and each shipped config runs through
Snakemake to its last figure, feature page and report on them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import REPO, environment

from workflow_scripts import output_cache, rehearsal
from workflow_scripts.config import ConfigError
from workflow_scripts.plan import resolve
from workflow_scripts.rehearsal.stand_ins import lay_out

SHIPPED = {name: REPO / "configs" / f"{name}.yaml" for name in ("study", "full", "census")}


def shipped(name: str) -> dict:
    return yaml.safe_load(SHIPPED[name].read_text())


def test_the_shrunk_config_keeps_every_name_and_is_valid(tmp_path):
    config = shipped("full")
    small = rehearsal.shrink(config, tmp_path)
    assert small["models"].keys() == config["models"].keys()
    assert small["figures"]["groups"] == config["figures"]["groups"]
    assert small["analyses"] == config["analyses"]
    for name, spec in small["models"].items():
        if spec["source"].startswith("hf:"):
            assert (spec["blocks"], spec["width"]) == (rehearsal.BLOCKS, rehearsal.WIDTH)
            assert "gpus" not in spec and "max_memory" not in spec
        else:
            assert spec == config["models"][name]
    for spec in small["datasets"].values():
        assert spec["rows"] <= rehearsal.ROWS and spec["shards"] == 1
    images = small["datasets"]["imagenet-val"]["source"]
    assert images == f"imagefolder:{tmp_path.resolve()}/images/data/imagenet/val"
    for run in small["training"]["runs"].values():
        assert run["steps"] == rehearsal.STEPS and "epochs" not in run
        assert all(step <= rehearsal.STEPS for step in run.get("snapshots", []))
        assert len(run.get("seeds", [])) <= 2
    # a layer of a 12-block model is scaled to the stand-in's 2; a ResNet keeps its blocks
    layers = {entry["model"]: entry["layer"] for entry in small["figures"]["top_examples"]}
    assert layers == {"roberta-base": round(10 * 2 / 12), "resnet50": 15}
    plan = resolve(small)  # every check of the real config passes on the shrunk one
    assert set(plan.figure_groups) == set(config["figures"]["groups"])


def test_a_rehearsal_without_its_stand_ins_is_refused(tmp_path):
    with pytest.raises(rehearsal.RehearsalError, match="no stand-ins there; lay them out first"):
        rehearsal.staged({**shipped("study"), "rehearsal": str(tmp_path)})
    # stand-ins of another config: the first source it lacks is named
    laid_out = {"sources": ["hf:openai-community/gpt2"]}
    (tmp_path / rehearsal.LAID_OUT).write_text(json.dumps(laid_out))
    lacking = "no stand-in there of hf:FacebookAI/roberta-base"
    with pytest.raises(rehearsal.RehearsalError, match=lacking):
        rehearsal.staged({**shipped("study"), "rehearsal": str(tmp_path)})


def test_an_id_not_recorded_cannot_be_rehearsed(tmp_path):
    config = shipped("study")
    config["models"]["gpt2"]["source"] = "hf:someone/not-recorded"
    with pytest.raises(rehearsal.RehearsalError, match=r"models\.gpt2: hf:someone/not-recorded"):
        lay_out(config, tmp_path)
    assert not (tmp_path / rehearsal.LAID_OUT).exists()


# one of each kind the shipped configs need: a decoder stored in bfloat16 (a mixture of experts),
# the multimodal Gemma 3, an MNLI fine-tune with its classifier, a base encoder, the study's
# gptr2, torchvision, MNLI, Wikipedia and an ImageNet folder
KINDS = {
    "models": {
        "qwen-moe": {"family": "decoder", "source": "hf:Qwen/Qwen3-30B-A3B", "dtype": "auto"},
        "gemma": {"family": "decoder", "source": "hf:google/gemma-3-27b-pt"},
        "roberta-mnli": {
            "family": "roberta",
            "source": "hf:George-Ogden/roberta-base-cased-finetuned-mnli",
            "head": "sequence_classification",
            "num_labels": 3,
        },
        "roberta": {"family": "roberta", "source": "hf:FacebookAI/roberta-base"},
        "gptr2": {
            "family": "gptr2",
            "source": "hf:George-Ogden/gptr2-nano-with-momentum-with-weight-decay",
        },
        "resnet18": {"family": "resnet", "source": "torchvision:resnet18"},
    },
    "datasets": {
        "mnli": {"source": "hf:nyu-mll/glue/mnli:validation_matched", "kind": "pairs"},
        "wikipedia": {"source": "hf:wikimedia/wikipedia/20231101.en:train", "kind": "text"},
        "imagenet": {"source": "imagefolder:/data/imagenet/val"},
    },
}

# what a job of the rehearsal sees: each model's config and tokenizer, each dataset's columns
# and label names, torchvision's weights, all through the libraries' own loaders, offline
PROBE = """
import json, sys
import datasets, torchvision, transformers
out = {}
for repo in sys.argv[1].split(","):
    config = transformers.AutoConfig.from_pretrained(repo)
    tokenizer = transformers.AutoTokenizer.from_pretrained(repo)
    out[repo] = [config.model_type, type(tokenizer).__name__, config.architectures]
for path, name, split in (("nyu-mll/glue", "mnli", "validation_matched"),
                          ("wikimedia/wikipedia", "20231101.en", "train")):
    data = datasets.load_dataset(path, name, split=split)
    label = data.features.get("label")
    out[path] = [data.column_names, getattr(label, "names", None), len(data)]
weights = torchvision.models.get_model_weights("resnet18").DEFAULT
model = torchvision.models.get_model("resnet18", weights=weights)
out["resnet18"] = sum(p.numel() for p in model.parameters())
print(json.dumps(out))
"""


def test_stand_ins_resolve_offline_as_the_real_sources_do(tmp_path):
    record = rehearsal.hub_record()
    done = lay_out({**KINDS, "analyses": []}, tmp_path)
    assert len(done["hub models"]) == 5 and done["torchvision"] == ["resnet18"]
    assert rehearsal.laid_out_in(tmp_path) == rehearsal.sources(KINDS)
    repos = [spec["source"][3:] for spec in KINDS["models"].values() if "hf:" in spec["source"]]
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(repos)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(**rehearsal.environment(tmp_path)),
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.splitlines()[-1])
    for repo in repos:
        model_type, tokenizer, architectures = seen[repo]
        expected = record["models"][repo]["model_type"]
        assert model_type == expected, repo
    assert seen["FacebookAI/roberta-base"][1:] == ["RobertaTokenizer", ["RobertaForMaskedLM"]]
    assert seen["George-Ogden/roberta-base-cased-finetuned-mnli"][2] == [
        "RobertaForSequenceClassification"
    ]
    assert seen["George-Ogden/gptr2-nano-with-momentum-with-weight-decay"][1:] == [
        "GPT2Tokenizer",
        ["GPTR"],  # the author's class, as the study's checkpoints name it
    ]
    assert seen["google/gemma-3-27b-pt"][2] == ["Gemma3ForConditionalGeneration"]
    assert seen["Qwen/Qwen3-30B-A3B"][1] == "Qwen2Tokenizer"
    glue, wikipedia = record["datasets"]["nyu-mll/glue"], record["datasets"]["wikimedia/wikipedia"]
    assert seen["nyu-mll/glue"] == [list(glue["columns"]), glue["label_names"], 2 * rehearsal.ROWS]
    assert seen["wikimedia/wikipedia"] == [list(wikipedia["columns"]), None, 2 * rehearsal.ROWS]
    assert seen["resnet18"] == 11_689_512  # torchvision's ResNet-18, its weights loaded
    images = rehearsal.image_folder(tmp_path, "/data/imagenet/val")
    classes = sorted(p.name for p in images.iterdir())
    assert len(classes) == 1000 and all(len(list((images / c).iterdir())) == 1 for c in classes)


def test_a_rehearsal_keeps_its_own_cache_whatever_the_environment_says(tmp_path):
    """A stand-in is keyed as the real model it stands in for: it must never reach a real
    cache."""
    assert rehearsal.environment(tmp_path)[output_cache.VARIABLE] == str(
        tmp_path.resolve() / "cache"
    )


def snakemake_on(name: str, folder: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """Snakemake on the shipped config ``name`` rehearsed on the stand-ins in ``folder``, run as
    a user runs it, from the repository."""
    command = [sys.executable, "-m", "snakemake", "--configfile", str(SHIPPED[name])]
    command += ["--config", f"rehearsal={folder}", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=environment()
    )


def rehearse(name: str, folder: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Lay out the stand-ins of the shipped config ``name`` and run it on them with two cores;
    the finished Snakemake and its seconds."""
    start = time.monotonic()
    laid = subprocess.run(
        [sys.executable, "-m", "workflow_scripts.rehearsal", str(SHIPPED[name]), str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment(),
    )
    assert laid.returncode == 0, laid.stderr[-3000:]
    done = snakemake_on(name, folder, "--cores", "2", timeout=5400)
    return done, time.monotonic() - start


def named_figures(config: dict) -> list[str]:
    """Every figure, feature page and table the config names, read from the config itself."""
    small = rehearsal.shrink(config, Path("."))
    names = [
        f"{figure}-{group}.png"
        for group, spec in config["figures"]["groups"].items()
        for figure in spec["figures"]
    ]
    for entry in small["figures"].get("top_examples", []):
        where = f"{entry['model']}-{entry['dataset']}-layer{entry['layer']}"
        names += [f"top-examples-{where}.png", f"features-{where}.html"]
    if config.get("training", {}).get("runs"):
        names.append("training.png")
    return names


# the census runs in `make test`; the study and full rehearsals (300 and 640 jobs, their ResNets'
# ablations the longest) in `make rehearsal`
LONG = pytest.mark.rehearsal


@pytest.mark.workflow
@pytest.mark.parametrize(
    "name", ["census", pytest.param("study", marks=LONG), pytest.param("full", marks=LONG)]
)
def test_a_shipped_config_rehearses_to_its_last_figure(name, tmp_path):
    folder = tmp_path / name
    done, seconds = rehearse(name, folder)
    assert done.returncode == 0, done.stderr[-6000:]
    print(f"rehearsal of configs/{name}.yaml: {seconds:.0f} s")
    run = folder / "run"
    figures = run / "results/figures"
    missing = [f for f in named_figures(shipped(name)) if not (figures / f).is_file()]
    assert not missing, missing
    assert (run / "results/tables/statistics.csv").is_file()
    report = snakemake_on(name, folder, "--report", str(run / "report.html"), timeout=600)
    assert report.returncode == 0, report.stderr[-4000:]
    assert (run / "report.html").stat().st_size > 0
    assert any((folder / "cache").iterdir())  # the rehearsal's own cache, not the checkout's


def test_a_config_error_fails_the_rehearsal_before_any_job(tmp_path):
    config = shipped("study")
    config["figures"]["top_examples"][0]["layer"] = 99
    with pytest.raises(ConfigError, match="layer"):
        resolve(rehearsal.shrink(config, tmp_path))


def test_a_stand_in_resnets_stream_stays_in_float16s_range():
    """full.yaml stores the ResNets' stream as float16: at torchvision's random initialisation
    ResNet-152's stream passes float16's range (extraction then stops, rightly), so the
    stand-in's residual branches are scaled down; every block's output stays in range."""
    import torch
    import torchvision

    from workflow_scripts.rehearsal.stand_ins import stand_in_resnet

    def peak(model) -> float:
        outputs = []
        blocks = [
            b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer
        ]
        hooks = [
            b.register_forward_hook(lambda m, i, o: outputs.append(o.abs().max())) for b in blocks
        ]
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
        for hook in hooks:
            hook.remove()
        assert len(outputs) == 50
        return max(outputs).item()

    float16_max = torch.finfo(torch.float16).max
    torch.manual_seed(0)
    assert peak(torchvision.models.get_model("resnet152", weights=None)) > float16_max
    assert peak(stand_in_resnet("resnet152")) < float16_max / 1000
