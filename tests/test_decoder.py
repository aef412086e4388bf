"""The decoder family (Llama, Qwen2, GPT-NeoX from Hugging Face): read-outs equal to the model's
hidden states, storing and fetching, extraction, ablation and the skipped block."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from support import ABLATION_OPTIONS, EXTRACT_OPTIONS, hub_snapshot, run_stage
from torch import nn

from workflow_scripts import extract as extraction
from workflow_scripts import families
from workflow_scripts.ablate import ablate
from workflow_scripts.activations import open_shard
from workflow_scripts.data import builtin, store
from workflow_scripts.fetch_model import fetch
from workflow_scripts.models import hf_decoder, hooked, load_adapter
from workflow_scripts.models.builtin_tokenizer import builtin_tokenizer
from workflow_scripts.models.store import MANIFEST, WEIGHTS, read_manifest
from workflow_scripts.options.ablation import AblationOptions
from workflow_scripts.options.extract import ExtractOptions
from workflow_scripts.plan import resolve
from workflow_scripts.stage_code import code_key

TYPES = ["llama", "qwen2", "gpt_neox"]
CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}
ARCH = {"layers": 2, "width": 32, "heads": 2, "context": 64}
PREMISES = ["the tall teacher carried the book in the park .", "the old pilot found the map ."]
HYPOTHESES = ["a person carried the book .", "nobody found the map in the office ."]
EXTRACT = ExtractOptions(**{**EXTRACT_OPTIONS, "dtype": "float32"})
ABLATE = AblationOptions(**ABLATION_OPTIONS)


def spec(kind: str, **changes) -> dict:
    return {
        "family": "decoder",
        "source": "init:",
        "arch": {**ARCH, "type": kind},
        "seed": 0,
        **changes,
    }


@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("decoders")
    dirs = {}
    for kind in TYPES:
        dirs[kind] = root / kind
        fetch(spec(kind), dirs[kind])
    return dirs


def encode(adapter):
    return dict(adapter.tokenizer(PREMISES, HYPOTHESES, padding=True, return_tensors="pt"))


def zero_branches(model, blocks):
    """Zero the output projections of the attention and MLP of ``blocks`` (weights and biases):
    those blocks then add nothing to the stream."""
    _, layers, _ = hf_decoder.layout(model)
    for i in blocks:
        block = layers[i]
        if hasattr(block, "self_attn"):  # Llama, Qwen2
            projections = (block.self_attn.o_proj, block.mlp.down_proj)
        else:  # GPT-NeoX
            projections = (block.attention.dense, block.mlp.dense_4h_to_h)
        for proj in projections:
            nn.init.zeros_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)


def test_the_family_is_registered_as_a_causal_text_model():
    family = families.get("decoder")
    assert family.module == "workflow_scripts.models.hf_decoder"
    assert family.default_head == "causal_lm" and family.modality == "text"
    assert family.readouts(12) == 13
    assert family.readouts(family.blocks(spec("qwen2")["arch"])) == 3


@pytest.mark.parametrize("kind", TYPES)
def test_streams_equal_hugging_face_hidden_states(decoder_dirs, kind):
    adapter, manifest = load_adapter(decoder_dirs[kind])
    assert type(adapter.model).__name__ == CLASSES[kind] and manifest["family"] == "decoder"
    inputs = encode(adapter)
    assert (inputs["attention_mask"] == 0).any()  # the batch has padding, on the right
    assert (inputs["attention_mask"][:, 0] == 1).all()
    _, layers, _ = hf_decoder.layout(adapter.model)
    last_block = []
    handle = layers[-1].register_forward_hook(lambda m, a, out: last_block.append(out))
    with torch.no_grad():
        streams = adapter.streams(inputs)
        hidden = adapter.model(**inputs, output_hidden_states=True).hidden_states
    handle.remove()
    assert len(streams) == len(hidden) == len(adapter.readouts) == 3
    assert [(r.block, r.name) for r in adapter.readouts] == [
        (0, "embeddings"),
        (1, "block.0"),
        (2, "block.1"),
    ]
    for k in range(2):
        assert streams[k].shape == (2, inputs["input_ids"].shape[1], 32)
        torch.testing.assert_close(streams[k], hidden[k], rtol=0, atol=0)
    # Hugging Face's last hidden state is after the final norm; the read-out is the raw stream,
    # the last block's own output
    torch.testing.assert_close(streams[2], last_block[-1], rtol=0, atol=0)
    torch.testing.assert_close(adapter.final_norm(streams[2]), hidden[2], rtol=0, atol=0)
    assert not torch.allclose(streams[2], hidden[2])


@pytest.mark.parametrize("kind", TYPES)
def test_final_readout_can_follow_hugging_face(decoder_dirs, kind):
    adapter, _ = load_adapter(decoder_dirs[kind], final_readout="final_norm")
    inputs = encode(adapter)
    with torch.no_grad():
        streams = adapter.streams(inputs)
        hidden = adapter.model(**inputs, output_hidden_states=True).hidden_states
    for stream, reference in zip(streams, hidden):
        torch.testing.assert_close(stream, reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="raw or final_norm"):
        hf_decoder.adapter(adapter.model, adapter.tokenizer, "decoder", "ln_f")


@pytest.mark.parametrize("kind", TYPES)
def test_init_round_trips_through_fetch(decoder_dirs, tmp_path, kind):
    """A stored model is the model ``init`` builds, bit for bit, and fetching again gives the
    same files."""
    manifest = read_manifest(decoder_dirs[kind])
    assert manifest["source"] == "init:" and manifest["init"]["arch"]["type"] == kind
    assert {WEIGHTS, "config.json", "tokenizer.json"} <= set(manifest["files"])
    built, _ = hf_decoder.init(spec(kind))
    adapter, _ = load_adapter(decoder_dirs[kind])
    assert manifest["parameters"] == sum(p.numel() for p in adapter.model.parameters())
    stored = adapter.model.state_dict()
    assert stored.keys() == built.state_dict().keys()
    for name, value in built.state_dict().items():
        torch.testing.assert_close(stored[name], value, rtol=0, atol=0, msg=name)
    again = fetch(spec(kind), tmp_path / "again")
    assert again["files"] == manifest["files"]
    other = fetch(spec(kind, seed=1), tmp_path / "seed1")
    assert other["files"][WEIGHTS] != manifest["files"][WEIGHTS]


def test_local_save_pretrained_directory(tmp_path):
    """A plain save_pretrained folder (no manifest, a tokenizer without a pad token, weights
    stored in bfloat16) loads through local:, in float32, padding with eos on the right."""
    config = transformers.Qwen2Config(
        vocab_size=len(builtin_tokenizer("gpt2")),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(3)
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    tokenizer = builtin_tokenizer("gpt2")
    tokenizer.pad_token = None
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    assert not (plain / MANIFEST).exists()
    manifest = fetch(
        {"family": "decoder", "source": f"local:{plain}", "blocks": 2}, tmp_path / "stored"
    )
    assert manifest["parameters"] == sum(p.numel() for p in model.parameters())
    assert manifest["source"] == f"local:{plain}" and manifest["revision"] is None
    adapter, _ = load_adapter(tmp_path / "stored")
    assert adapter.tokenizer.pad_token == adapter.tokenizer.eos_token == "<|endoftext|>"
    assert adapter.tokenizer.padding_side == "right"
    assert all(p.dtype == torch.float32 for p in adapter.model.parameters())
    inputs = encode(adapter)
    reference = model.float()  # its rotary frequencies went through bfloat16: not bit-exact
    with torch.no_grad():
        streams = adapter.streams(inputs)
        hidden = reference(**inputs, output_hidden_states=True).hidden_states
    assert len(streams) == 3
    for k in range(2):
        torch.testing.assert_close(streams[k], hidden[k], rtol=1e-5, atol=1e-5)


def test_a_model_another_family_reads_is_refused_when_fetched(model_dirs, tmp_path):
    plain = tmp_path / "gpt2"
    shutil.copytree(model_dirs["gpt2"], plain)
    (plain / MANIFEST).unlink()
    with pytest.raises(  # its config.json's model_type, checked before anything is loaded
        ValueError, match=r"is a 'gpt2' model: family 'gpt2' reads it, not 'decoder'"
    ):
        fetch({"family": "decoder", "source": f"local:{plain}", "blocks": 2}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_arch_type_and_other_heads_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown decoder arch.type 'gpt2'.*llama, qwen2"):
        hf_decoder.init(spec("gpt2"))
    with pytest.raises(ValueError, match="only the causal_lm head"):
        hf_decoder.init(spec("llama", head="sequence_classification"))


@pytest.mark.parametrize(
    "kind,dataset", [("llama", "pairs"), ("qwen2", "corpus"), ("gpt_neox", "corpus")]
)
def test_extraction_stores_every_readout(decoder_dirs, dataset_files, tmp_path, kind, dataset):
    out = tmp_path / "s.zarr"
    extraction.extract(
        decoder_dirs[kind],
        dataset_files[dataset],
        0,
        1,
        out,
        EXTRACT,
        code_key("workflow_scripts.extract", families.get("decoder").module),
        readouts=3,
    )
    group = open_shard(out)
    attrs = dict(group.attrs)
    assert attrs["family"] == "decoder" and attrs["modality"] == "text"
    assert [r["name"] for r in attrs["readouts"]] == ["embeddings", "block.0", "block.1"]
    assert sorted(k for k in group.array_keys() if k.startswith("layer-")) == [
        "layer-0",
        "layer-1",
        "layer-2",
    ]
    # the stored rows of the first example equal its stream computed alone
    adapter, _ = load_adapter(decoder_dirs[kind])
    data, _, _ = store.read(dataset_files[dataset])
    first = data.iloc[0]
    text = ([first["premise"]], [first["hypothesis"]]) if dataset == "pairs" else ([first["text"]],)
    rows = group["example_id"][:] == first["example_id"]
    enc = dict(adapter.tokenizer(*text, truncation=True, max_length=40, return_tensors="pt"))
    with torch.no_grad():
        streams = adapter.streams(enc)
    length = enc["input_ids"].shape[1]
    for k in range(3):
        np.testing.assert_allclose(
            group[f"layer-{k}"][:][rows][:length], streams[k][0].numpy(), rtol=1e-4, atol=1e-5
        )
    with pytest.raises(ValueError, match="has 3 read-out points.*says 13"):
        extraction.extract(
            decoder_dirs[kind],
            dataset_files[dataset],
            0,
            1,
            tmp_path / "x.zarr",
            EXTRACT,
            readouts=13,
        )


@pytest.mark.parametrize("kind", TYPES)
def test_ablating_nothing_gives_the_models_own_logits(decoder_dirs, kind):
    adapter, _ = load_adapter(decoder_dirs[kind])
    inputs = encode(adapter)
    with torch.no_grad():
        own = adapter.model(**inputs).logits
        with adapter.ablated(set()):
            ablated = adapter.logits(inputs)
    torch.testing.assert_close(ablated, own, rtol=0, atol=0)


@pytest.mark.parametrize("kind", TYPES)
def test_tail_ablation_is_the_final_norm_and_head_on_the_stream(decoder_dirs, kind):
    adapter, _ = load_adapter(decoder_dirs[kind])
    inputs = encode(adapter)
    blocks = list(hf_decoder.layout(adapter.model)[1])
    n = len(adapter.block_slots)
    with torch.no_grad():
        streams = adapter.streams(inputs)
        for k in range(len(adapter.readouts)):
            with adapter.ablated(set(range(k, n))):
                tail = adapter.logits(inputs)
                ablated_streams = adapter.streams(inputs)  # the skipped blocks pass it on
            lens = adapter.lm_head(adapter.final_norm(streams[k]))
            torch.testing.assert_close(tail, lens, rtol=1e-5, atol=1e-5)
            for j in range(k, len(adapter.readouts)):
                torch.testing.assert_close(ablated_streams[j], streams[k], rtol=0, atol=0)
    assert all(a is b for a, b in zip(hf_decoder.layout(adapter.model)[1], blocks))  # undone


@pytest.mark.parametrize("kind", TYPES)
def test_head_ablation_equals_zeroing_the_first_blocks_branches(decoder_dirs, kind):
    adapter, _ = load_adapter(decoder_dirs[kind])
    zeroed, _ = load_adapter(decoder_dirs[kind])
    zero_branches(zeroed.model, blocks=[0])
    inputs = encode(adapter)
    with torch.no_grad():
        with adapter.ablated({0}):
            head = adapter.logits(inputs)
        reference = zeroed.logits(inputs)
        assert not torch.allclose(adapter.logits(inputs), reference)
    torch.testing.assert_close(head, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", TYPES)
def test_skipped_block_returns_what_the_block_returns(decoder_dirs, kind):
    """Called as the model calls its blocks (transformers 5: the stream positionally, then the
    mask, position ids and embeddings, cache flags as keywords), the skipped block returns the
    same kind of thing as the block, holding the stream it was given."""
    adapter, _ = load_adapter(decoder_dirs[kind])
    block = hf_decoder.layout(adapter.model)[1][0]
    calls = []
    handle = block.register_forward_pre_hook(
        lambda m, a, kw: calls.append((a, kw)), with_kwargs=True
    )
    with torch.no_grad():
        adapter.logits(encode(adapter))
        handle.remove()
        args, kwargs = calls[0]
        assert "position_embeddings" in kwargs and "attention_mask" in kwargs
        real = block(*args, **kwargs)
        skipped = hooked.SkippedBlock(block, {})(*args, **kwargs)
    assert type(skipped) is type(real)
    stream = args[0] if args else kwargs["hidden_states"]
    out = skipped[0] if isinstance(skipped, tuple) else skipped
    assert out is stream
    assert not list(hooked.SkippedBlock(block, {}).parameters())


class TupleBlock(nn.Module):
    """A block as transformers 4 wrote them: a tuple whose length follows the flags."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(
        self, hidden_states, attention_mask=None, output_attentions=False, use_cache=False, **kwargs
    ):
        self.calls += 1
        return (
            (2 * hidden_states,)
            + (("weights",) if output_attentions else ())
            + (("cache",) if use_cache else ())
        )


def test_skipped_block_keeps_a_tuple_returning_blocks_form():
    block, form = TupleBlock(), {}
    skipped = hooked.SkippedBlock(block, form)
    x = torch.randn(2, 3, 4)
    out = skipped(x)
    assert isinstance(out, tuple) and len(out) == 1 and out[0] is x
    assert skipped(x)[0] is x
    out = skipped(x, attention_mask=None, output_attentions=True, use_cache=True)
    assert len(out) == 3 and out[0] is x and out[1:] == (None, None)
    assert len(skipped(hidden_states=x, use_cache=True)) == 2
    calls = block.calls
    hooked.SkippedBlock(block, form)(x, use_cache=True)  # another block, the same form
    assert block.calls == calls == 3  # the block ran once per setting of the flags


def test_logit_lens_accuracy_of_a_decoder(decoder_dirs, dataset_files):
    frame = ablate(decoder_dirs["llama"], dataset_files["corpus"], ABLATE)
    adapter, _ = load_adapter(decoder_dirs["llama"])
    correct = total = 0
    for text in builtin.generate("corpus", 12, 0)["text"]:
        ids = adapter.tokenizer(text, truncation=True, max_length=48, return_tensors="pt")[
            "input_ids"
        ]
        with torch.no_grad():
            predicted = adapter.model(ids).logits[0, :-1].argmax(-1)
        correct += int((predicted == ids[0, 1:]).sum())
        total += ids.shape[1] - 1
    top1 = frame[frame["metric"] == "top1"]
    full = top1[(top1["direction"] == "tail") & (top1["layer"] == 2)]
    assert full["predictions"].item() == total
    assert full["value"].item() == pytest.approx(correct / total)
    assert top1.groupby("direction")["blocks_ablated"].apply(list).to_dict() == {
        "head": [0, 1, 2],
        "tail": [2, 1, 0],
    }


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hub_decoder_is_pinned_and_loads(decoder_dirs, tmp_path):
    """hf: through huggingface_hub's own cache, offline: ``main`` resolves to its commit, which
    the manifest pins."""
    hub_snapshot(tmp_path / "hub", "someone/tiny-llama", decoder_dirs["llama"], COMMIT)
    spec = {"family": "decoder", "source": "hf:someone/tiny-llama", "blocks": 2}
    done = run_stage("fetch_model", tmp_path / "hub", spec=json.dumps(spec), out=tmp_path / "m")
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(tmp_path / "m")
    assert manifest["revision"] == COMMIT and manifest["requested_revision"] == "main"
    adapter, _ = load_adapter(tmp_path / "m")
    reference, _ = load_adapter(decoder_dirs["llama"])
    assert len(adapter.readouts) == 3
    inputs = encode(adapter)
    with torch.no_grad():
        torch.testing.assert_close(adapter.logits(inputs), reference.logits(inputs), rtol=0, atol=0)


def test_hub_model_of_another_family_is_refused_before_its_weights(model_dirs, tmp_path):
    """Only the config is read before the check: the snapshot here has no weights at all."""
    folder = tmp_path / "bert"
    folder.mkdir()
    shutil.copy(model_dirs["bert"] / "config.json", folder)
    hub_snapshot(tmp_path / "hub", "google-bert/bert-base-uncased", folder, COMMIT)
    spec = {"family": "decoder", "source": "hf:google-bert/bert-base-uncased", "blocks": 12}
    done = run_stage("fetch_model", tmp_path / "hub", spec=json.dumps(spec), out=tmp_path / "m")
    assert done.returncode == 1 and "Traceback" not in done.stderr  # one line
    assert (
        "hf:google-bert/bert-base-uncased is a 'bert' model: family 'bert' reads it, not "
        "'decoder'" in done.stderr
    )
    assert not (tmp_path / "m").exists()


def test_config_accepts_decoder_models(default_config):
    from workflow_scripts.config import ConfigError, validate

    config = copy.deepcopy(default_config)
    config["models"]["pythia"] = {
        "family": "decoder",
        "source": "hf:EleutherAI/pythia-160m",
        "blocks": 12,
    }
    config["models"]["llama-init"] = {
        "family": "decoder",
        "source": "init:",
        "arch": {**ARCH, "type": "qwen2", "context": 128},
    }
    config["analyses"].append({"models": ["pythia", "llama-init"], "datasets": ["corpus"]})
    config["ablation"]["analyses"].append({"models": ["llama-init"], "datasets": ["corpus"]})
    models = resolve(config).models
    assert models["pythia"].readouts == 13
    assert models["llama-init"].readouts == 3
    assert models["pythia"].thresholds == (10.0,)
    bad = copy.deepcopy(default_config)
    bad["models"]["gpt2-init"]["arch"]["type"] = "llama"  # a decoder setting only
    with pytest.raises(ConfigError, match=r"gpt2-init\.arch\.type: not a setting of family gpt2"):
        validate(bad)
    bad = copy.deepcopy(default_config)
    bad["models"]["x"] = {"family": "decoder", "source": "init:", "arch": {"type": "gpt2", **ARCH}}
    with pytest.raises(
        ConfigError,
        match=r"models\.x\.arch\.type: 'gpt2' is not allowed; "
        r"allowed values: llama, qwen2, gpt_neox",
    ):
        validate(bad)
