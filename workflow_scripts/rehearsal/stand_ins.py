"""The stand-ins of a rehearsal (``workflow_scripts.rehearsal``): tiny checkpoints, datasets,
weight files and image folders under the real names of what a config names, laid out where the
libraries look for them offline."""

from __future__ import annotations

import inspect
import io
import json
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from torch import nn

from workflow_scripts.rehearsal import (
    BLOCKS,
    HUB_RECORD,
    IMAGE_CLASSES,
    LAID_OUT,
    ROWS,
    WIDTH,
    RehearsalError,
    commit_of,
    hub_record,
    image_folder,
    laid_out_in,
    sources,
    unpinned,
)
from workflow_scripts.sources import Source, hub_dataset

# transformers' config of a tiny model of each decoder-only model_type the records name (the
# vocabulary and special token ids are the stand-in tokenizer's)
LLAMA_LIKE = {
    "hidden_size": WIDTH,
    "intermediate_size": 2 * WIDTH,
    "num_hidden_layers": BLOCKS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
GEMMA_LIKE = {**LLAMA_LIKE, "head_dim": 8, "sliding_window": 4, "query_pre_attn_scalar": 8}
MOE = {"num_experts_per_tok": 2}
TINY_DECODERS = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": {**LLAMA_LIKE, "head_dim": 8},
    "qwen3_moe": {
        **LLAMA_LIKE,
        **MOE,
        "head_dim": 8,
        "num_experts": 4,
        "moe_intermediate_size": 32,
    },
    "mistral": {**LLAMA_LIKE, "sliding_window": None},
    "mixtral": {**LLAMA_LIKE, **MOE, "num_local_experts": 4},
    "gemma2": GEMMA_LIKE,
    "olmo2": LLAMA_LIKE,
    "phi3": LLAMA_LIKE,
    "gpt_neox": {
        "hidden_size": WIDTH,
        "intermediate_size": 2 * WIDTH,
        "num_hidden_layers": BLOCKS,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
    },
}
# the tiny encoders and GPT-2 (position tables as long as the real ones: the study pads to 128)
TINY_TEXT = {
    "gpt2": {"n_embd": WIDTH, "n_layer": BLOCKS, "n_head": 4, "n_positions": 1024},
    "roberta": {
        "hidden_size": WIDTH,
        "num_hidden_layers": BLOCKS,
        "num_attention_heads": 4,
        "intermediate_size": 2 * WIDTH,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
    },
    "bert": {
        "hidden_size": WIDTH,
        "num_hidden_layers": BLOCKS,
        "num_attention_heads": 4,
        "intermediate_size": 2 * WIDTH,
    },
}


# --- the stand-ins --------------------------------------------------------------------------


def lay_out(config: dict, folder: Path, record: dict | None = None) -> dict[str, list[str]]:
    """Every stand-in the config ``config`` needs, in ``folder``; what was laid out, by kind.
    Stand-ins already there are kept."""
    record = hub_record() if record is None else record
    folder = Path(folder).resolve()
    done: dict[str, list[str]] = {"hub models": [], "datasets": [], "torchvision": [], "images": []}
    hub_models, hub_datasets = record.get("models", {}), record.get("datasets", {})
    for name, spec in config["models"].items():
        source = Source.parse(spec["source"])
        if source.scheme == "hf":
            repo = unpinned(source).location
            if repo not in hub_models:
                raise RehearsalError(
                    f"models.{name}: {spec['source']} is not in {HUB_RECORD.name}: record its "
                    "model_type, blocks and width, and where they were read, first"
                )
            _lay_out_hub_model(folder / "hub", repo, hub_models[repo], spec)
            done["hub models"].append(repo)
        elif source.scheme == "torchvision":
            done["torchvision"].append(_lay_out_torchvision(folder / "torch", source.location))
    for name, spec in config["datasets"].items():
        source = Source.parse(spec["source"])
        if source.scheme == "hf":
            repo, subset, split = hub_dataset(source.location)
            if repo not in hub_datasets:
                raise RehearsalError(
                    f"datasets.{name}: {spec['source']} is not in {HUB_RECORD.name}: record its "
                    "columns and label names, and where they were read, first"
                )
            where = (repo, subset or "default", split.partition("[")[0])  # a slice dropped
            _lay_out_hub_dataset(folder / "datasets", *where, hub_datasets[repo])
            done["datasets"].append(str(source))
        elif source.scheme == "imagefolder":
            _lay_out_images(image_folder(folder, source.location))
            done["images"].append(source.location)
    every = sorted(set(laid_out_in(folder)) | set(sources(config)))
    (folder / LAID_OUT).write_text(json.dumps({"sources": every}, indent=1) + "\n")
    return done


def _lay_out_hub_model(hub: Path, repo: str, record: dict, spec: dict) -> None:
    snapshot = _snapshot(hub, "models", repo)
    if snapshot is None:
        return
    with tempfile.TemporaryDirectory(dir=hub) as tmp:
        if spec["family"] == "gptr2":
            study_gptr2(Path(tmp))
        else:
            _transformers_model(Path(tmp), record["model_type"], spec)
        _publish(Path(tmp), snapshot)


def _snapshot(hub: Path, kind: str, repo: str) -> Path | None:
    """The snapshot folder of ``repo`` in the hub cache ``hub`` as huggingface_hub lays it out
    (``main`` pointing at it); None where it is there already."""
    root = hub / f"{kind}--{repo.replace('/', '--')}"
    commit = commit_of(repo)
    snapshot = root / "snapshots" / commit
    if snapshot.is_dir():
        return None
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def _publish(files: Path, snapshot: Path) -> None:
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(files, snapshot)


def stand_in_tokenizer(model_type: str):
    """A tokenizer of the class transformers maps ``model_type`` to, with that class's own
    special tokens, over a byte-level vocabulary (every byte one token, and the byte-fallback
    tokens of the sentencepiece kinds): any text encodes, and nothing is unknown."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    name = TOKENIZER_MAPPING_NAMES.get(model_type)
    if not name or not hasattr(transformers, name) or name == "TokenizersBackend":
        name = "LlamaTokenizer" if model_type in SENTENCEPIECE_KINDS else "GPT2Tokenizer"
    cls = getattr(transformers, name)
    specials = [
        parameter.default
        for key, parameter in inspect.signature(cls.__init__).parameters.items()
        if key.endswith("_token") and isinstance(parameter.default, str)
    ]
    vocab: dict[str, int] = {}
    for token in [*specials, *bytes_to_unicode().values(), "▁"]:
        vocab.setdefault(token, len(vocab))
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return cls(vocab=vocab, merges=[])


# model types transformers maps to its generic backend whose checkpoints ship a sentencepiece
# (Llama-style) tokenizer
SENTENCEPIECE_KINDS = {"llama", "mistral", "mixtral", "phi3"}


def _transformers_model(folder: Path, model_type: str, spec: dict) -> None:
    """A random-initialised checkpoint of ``model_type`` with the head ``spec`` names (a
    classifier), else the masked- or causal-LM head the hub's checkpoints of it have."""
    tokenizer = stand_in_tokenizer(model_type)
    if tokenizer.pad_token is None and model_type in TINY_TEXT:
        tokenizer.pad_token = tokenizer.eos_token
    ids = {
        f"{kind}_token_id": tokenizer.convert_tokens_to_ids(getattr(tokenizer, f"{kind}_token"))
        for kind in ("bos", "eos", "pad")
        if getattr(tokenizer, f"{kind}_token", None) is not None
    }
    ids.setdefault("pad_token_id", ids["eos_token_id"])  # a config's default lies past the vocab
    settings = {"vocab_size": len(tokenizer), **ids}
    torch.manual_seed(int(commit_of(model_type)[:8], 16))
    head = spec.get("head")
    if model_type == "gemma3":  # the hub's larger Gemma 3 checkpoints: text inside image-text
        config = transformers.Gemma3Config(
            text_config={**GEMMA_LIKE, **settings, "vocab_size": len(tokenizer) + 3},
            vision_config={
                "hidden_size": WIDTH,
                "intermediate_size": 2 * WIDTH,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "image_size": 28,
                "patch_size": 14,
            },
            mm_tokens_per_image=4,
            boi_token_index=len(tokenizer),
            eoi_token_index=len(tokenizer) + 1,
            image_token_index=len(tokenizer) + 2,
        )
        model = transformers.Gemma3ForConditionalGeneration(config)
    elif model_type in TINY_DECODERS:
        config = transformers.AutoConfig.for_model(
            model_type, **TINY_DECODERS[model_type], **settings
        )
        model = transformers.AutoModelForCausalLM.from_config(config)
    elif model_type in TINY_TEXT:
        config = transformers.AutoConfig.for_model(model_type, **TINY_TEXT[model_type], **settings)
        if head == "sequence_classification":
            config.num_labels = spec.get("num_labels", 2)
            model = transformers.AutoModelForSequenceClassification.from_config(config)
        elif model_type == "gpt2":
            model = transformers.AutoModelForCausalLM.from_config(config)
        else:
            model = transformers.AutoModelForMaskedLM.from_config(config)
    else:
        raise RehearsalError(
            f"{spec['source']}: no stand-in for model_type {model_type!r}; add its tiny config "
            "to workflow_scripts/rehearsal/stand_ins.py"
        )
    if spec.get("dtype") == "auto":  # as most hub decoders are stored
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def study_gptr2(folder: Path):
    """A tiny gptr2-nano as the study's hub checkpoints are: a GPT-2 config naming the author's
    class ``GPTR``, weights in ``pytorch_model.bin`` with 0-d norm gains, GPT-2's tokenizer.
    Returns the model (GPT-2 with those norms), for tests to compare against."""
    tokenizer = stand_in_tokenizer("gpt2")
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=WIDTH,
        n_layer=BLOCKS,
        n_head=4,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    norms = [(p, n, c) for p in model.modules() for n, c in p.named_children()]
    for parent, name, child in norms:
        if isinstance(child, nn.LayerNorm):
            setattr(parent, name, StudyRMSNorm(child.eps))
            getattr(parent, name).weight.data.fill_(0.5 + torch.rand(()).item())
    folder.mkdir(parents=True, exist_ok=True)
    config.architectures = ["GPTR"]
    config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tokenizer.save_pretrained(folder)
    return model


class StudyRMSNorm(nn.Module):
    """The study's RMSLayerNorm (its src/models/text.py): one gain, a 0-d tensor."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x / torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True) + self.eps) * self.weight


RESIDUAL_SCALE = 0.2  # a stand-in ResNet's residual branches, against its stream


def stand_in_resnet(arch: str):
    """A random-initialised torchvision ``arch`` whose residual branches end at a fifth of the
    default scale (the last batch norm's gain of each block): at torchvision's initialisation
    each block doubles the stream's variance, and a ResNet-152's passes float16's range by its
    30th block, where trained weights stay in it."""
    import torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, Bottleneck | BasicBlock):
                last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
                last.weight.mul_(RESIDUAL_SCALE)
    return model


def _lay_out_torchvision(torch_home: Path, arch: str) -> str:
    """torchvision's weight file of ``arch`` where ``torch.hub`` keeps its downloads, holding a
    stand-in (:func:`stand_in_resnet`; in float16: half the disk, and loading casts it back)."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    target = torch_home / "hub" / "checkpoints" / Path(weights.url).name
    if not target.is_file():
        model = stand_in_resnet(arch)
        state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, target.with_suffix(".partial"))
        target.with_suffix(".partial").rename(target)
    return arch


def _lay_out_hub_dataset(cache: Path, repo: str, subset: str, split: str, record: dict) -> None:
    """The split ``split`` of the config ``subset`` of the hub dataset ``repo`` in ``datasets``'
    cache ``cache``, where ``load_dataset`` finds it offline."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, name = repo.split("/")
    commit = commit_of(repo)
    target = cache / f"{owner}___{name}" / subset / "0.0.0" / commit
    info = target / "dataset_info.json"
    splits = json.loads(info.read_text()).get("splits", {}) if info.is_file() else {}
    if split in splits:
        return
    features = _features(record)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        files = {}
        for each in [*splits, split]:
            frame = _rows(record, 2 * ROWS, seed=len(files))
            files[each] = [str(Path(tmp) / f"{each}.parquet")]
            datasets.Dataset.from_pandas(frame, features=features).to_parquet(files[each][0])
        builder = Parquet(
            cache_dir=str(Path(tmp) / "built"),
            dataset_name=name,
            config_name=subset,
            config_id=subset,
            hash=commit,
            data_files=files,
            features=features,
        )
        builder.download_and_prepare()
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(builder.cache_dir, target)


def _features(record: dict):
    import datasets

    features = {}
    for column, kind in record["columns"].items():
        if kind == "label":
            features[column] = datasets.ClassLabel(names=record["label_names"])
        else:
            features[column] = datasets.Value(kind)
    return datasets.Features(features)


def _rows(record: dict, rows: int, seed: int):
    """``rows`` rows with the record's columns, their text from the built-in sets (pairs for a
    set with premise and hypothesis, else paragraphs of the corpus)."""
    import pandas as pd

    from workflow_scripts.data import builtin

    columns = record["columns"]
    pairs = "premise" in columns
    made = builtin.generate("pairs" if pairs else "corpus", rows, seed)
    frame = pd.DataFrame(index=range(rows))
    for column, kind in columns.items():
        if column in made:
            frame[column] = made[column].to_numpy()
        elif kind == "label":
            frame[column] = [i % len(record["label_names"]) for i in range(rows)]
        elif kind == "string":
            frame[column] = [f"{column} {i}" for i in range(rows)]
        else:
            frame[column] = list(range(rows))
    return frame


def _lay_out_images(folder: Path) -> None:
    """One small JPEG in each of :data:`IMAGE_CLASSES` class folders named as ImageNet's are
    (WordNet ids, ``n`` and eight digits; sizes vary, as real photos do)."""
    from PIL import Image

    from workflow_scripts.data import builtin

    if folder.is_dir():
        return
    shapes = builtin.generate("shapes", IMAGE_CLASSES, 0)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, data in enumerate(shapes["image"]):
        klass = f"n{i:08d}"
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((48 + 8 * (i % 3), 40))
        (tmp / klass).mkdir(parents=True)
        image.save(tmp / klass / f"{klass}_{i:05d}.JPEG", quality=90)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)
