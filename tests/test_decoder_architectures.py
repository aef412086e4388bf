"""Every decoder-only architecture the field studies, through the decoder family: a tiny
random-initialised model of each, stored as a plain save_pretrained folder and fetched as
``local:``, whose read-out points are transformers' own ``hidden_states`` (the last one the last
block's output, read by a hook of the test's own), in float32 and in bfloat16; ablation and the
logit lens run on each. The blocks and the final norm are found on the model, not from a table."""

from __future__ import annotations

import pytest
import torch
import transformers
from support import ABLATION_OPTIONS
from torch import nn

from workflow_scripts.ablate import ablate
from workflow_scripts.fetch_model import fetch
from workflow_scripts.models import hf_decoder, load_adapter
from workflow_scripts.models.builtin_tokenizer import builtin_tokenizer
from workflow_scripts.options.ablation import AblationOptions

TOKENIZER = builtin_tokenizer("gpt2")
EOS = TOKENIZER.convert_tokens_to_ids(TOKENIZER.eos_token)
SHARED = {"vocab_size": len(TOKENIZER), "bos_token_id": EOS, "eos_token_id": EOS}
ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2}
LLAMA_LIKE = {
    **SHARED,
    **ATTENTION,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "max_position_embeddings": 64,
    "pad_token_id": None,
}
MOE = {"num_experts_per_tok": 2}
# (config class, settings, the class of the final norm the model has, or None)
ARCHITECTURES = {
    "llama": ("LlamaConfig", LLAMA_LIKE, "LlamaRMSNorm"),
    "qwen2": ("Qwen2Config", LLAMA_LIKE, "Qwen2RMSNorm"),
    "qwen3": ("Qwen3Config", {**LLAMA_LIKE, "head_dim": 8}, "Qwen3RMSNorm"),
    "mistral": ("MistralConfig", {**LLAMA_LIKE, "sliding_window": None}, "MistralRMSNorm"),
    "gemma2": (
        "Gemma2Config",
        {**LLAMA_LIKE, "head_dim": 8, "sliding_window": 4, "query_pre_attn_scalar": 8},
        "Gemma2RMSNorm",
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {**LLAMA_LIKE, "head_dim": 8, "sliding_window": 4, "query_pre_attn_scalar": 8},
        "Gemma3RMSNorm",
    ),
    # Gemma 3 as the hub's larger checkpoints are: its text model inside an image-text one
    "gemma3_vision": (
        "Gemma3Config",
        {
            "text_config": {
                **LLAMA_LIKE,
                "head_dim": 8,
                "sliding_window": 4,
                "query_pre_attn_scalar": 8,
                "vocab_size": len(TOKENIZER) + 3,
            },
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "image_size": 28,
                "patch_size": 14,
            },
            "mm_tokens_per_image": 4,
            "boi_token_index": len(TOKENIZER),
            "eoi_token_index": len(TOKENIZER) + 1,
            "image_token_index": len(TOKENIZER) + 2,
        },
        "Gemma3RMSNorm",
    ),
    "olmo2": ("Olmo2Config", LLAMA_LIKE, "Olmo2RMSNorm"),
    "phi3": ("Phi3Config", {**LLAMA_LIKE, "pad_token_id": EOS}, "Phi3RMSNorm"),
    "mixtral": ("MixtralConfig", {**LLAMA_LIKE, **MOE, "num_local_experts": 4}, "MixtralRMSNorm"),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            **LLAMA_LIKE,
            **MOE,
            "num_experts": 4,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
        "Qwen2MoeRMSNorm",
    ),
    "olmoe": ("OlmoeConfig", {**LLAMA_LIKE, **MOE, "num_experts": 4}, "OlmoeRMSNorm"),
    "gpt_neox": (
        "GPTNeoXConfig",
        {
            **SHARED,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
        },
        "LayerNorm",
    ),
    "opt": (
        "OPTConfig",
        {
            **SHARED,
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "word_embed_proj_dim": 32,
            "pad_token_id": EOS,
        },
        "LayerNorm",
    ),
    "falcon": (
        "FalconConfig",
        {**SHARED, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
        "LayerNorm",
    ),
    "bloom": (
        "BloomConfig",
        {**SHARED, "hidden_size": 32, "n_layer": 2, "n_head": 4, "pad_token_id": EOS},
        "LayerNorm",
    ),
    "gptj": (
        "GPTJConfig",
        {**SHARED, "n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "n_positions": 64},
        "LayerNorm",
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PREMISES = ["the tall teacher carried the book in the park .", "the old pilot found the map ."]
HYPOTHESES = ["a person carried the book .", "nobody found the map in the office ."]


def checkpoint(kind: str, folder) -> nn.Module:
    """A tiny random-initialised causal LM of ``kind``, saved (with the tokenizer) in
    ``folder``."""
    config_class, settings, _ = ARCHITECTURES[kind]
    config = getattr(transformers, config_class)(**settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> dict:
    """Every architecture fetched through local: into the stored layout."""
    root = tmp_path_factory.mktemp("architectures")
    dirs = {}
    for kind in ARCHITECTURES:
        checkpoint(kind, root / f"{kind}-plain")
        dirs[kind] = root / kind
        spec = {"family": "decoder", "source": f"local:{root / f'{kind}-plain'}", "blocks": 2}
        fetch(spec, dirs[kind])
    return dirs


def encode(adapter) -> dict:
    inputs = adapter.tokenizer(PREMISES, HYPOTHESES, padding=True, return_tensors="pt")
    assert (inputs["attention_mask"] == 0).any()  # padded on the right
    return dict(inputs)


def skipping(block: nn.Module):
    """A forward hook that makes ``block`` return its input stream in its own output's form:
    the test's own ablation, to check the adapter's against."""

    def hook(module, args, kwargs, output):
        stream = args[0] if args else kwargs["hidden_states"]
        return (stream, *output[1:]) if isinstance(output, tuple) else stream

    return block.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_readouts_are_transformers_hidden_states(stored, kind, dtype):
    adapter, _ = load_adapter(stored[kind], dtype=dtype)
    model = adapter.model
    assert {p.dtype for p in model.parameters()} == {DTYPES[dtype]}
    _, blocks, final_norm = hf_decoder.layout(model)
    assert len(blocks) == 2 and len(adapter.readouts) == 3
    assert type(final_norm).__name__ == ARCHITECTURES[kind][2]
    inputs = encode(adapter)
    last = []
    handle = blocks[-1].register_forward_hook(
        lambda m, a, out: last.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        streams = adapter.streams(inputs)
        hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    handle.remove()
    assert len(hidden) == 3 and all(s.dtype == DTYPES[dtype] for s in streams)
    for k in range(2):  # the embedding output (scaled, where the model scales it) and block 0
        torch.testing.assert_close(streams[k], hidden[k], rtol=0, atol=0)
    torch.testing.assert_close(streams[2], last[-1], rtol=0, atol=0)  # the raw last read-out
    torch.testing.assert_close(final_norm(streams[2]), hidden[2], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_ablation_and_the_logit_lens_follow_the_model(stored, kind):
    """Ablating nothing gives the model's logits; ablating blocks gives what the model computes
    when those blocks return their input (hooks of the test's own), at every read-out point."""
    adapter, _ = load_adapter(stored[kind])
    inputs = encode(adapter)
    _, blocks, _ = hf_decoder.layout(adapter.model)
    with torch.no_grad():
        own = adapter.model(**inputs, use_cache=False).logits
        with adapter.ablated(set()):
            torch.testing.assert_close(adapter.logits(inputs), own, rtol=0, atol=0)
        for ablated in ({0}, {1}, {0, 1}):
            with adapter.ablated(ablated):
                logits = adapter.logits(inputs)
            handles = [skipping(blocks[i]) for i in ablated]
            reference = adapter.model(**inputs, use_cache=False).logits
            for handle in handles:
                handle.remove()
            torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(logits, own)
    assert all(a is b for a, b in zip(hf_decoder.layout(adapter.model)[1], blocks))  # undone


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gemma3_vision", "mixtral", "opt", "bloom"])
def test_ablate_stage_runs_on_each(stored, dataset_files, kind):
    options = AblationOptions(**{**ABLATION_OPTIONS, "max_tokens": 32})
    frame = ablate(stored[kind], dataset_files["corpus"], options, dtype="bfloat16")
    top1 = frame[frame["metric"] == "top1"]
    assert len(top1) == 6 and top1["value"].between(0, 1).all()
    assert set(top1["direction"]) == {"head", "tail"}


def test_norms_found_by_running_the_model_where_there_are_several(stored):
    """BLOOM normalises its embeddings as well: the final norm is the one run after the last
    block, ``ln_f``, not ``word_embeddings_layernorm``."""
    adapter, _ = load_adapter(stored["bloom"])
    base = adapter.model.get_decoder()
    assert hf_decoder.layout(adapter.model)[2] is base.ln_f


def test_an_encoder_decoder_model_is_refused_naming_it(tmp_path):
    config = transformers.BartConfig(
        vocab_size=len(TOKENIZER),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    model = transformers.BartForConditionalGeneration(config)
    with pytest.raises(hf_decoder.UnsupportedModelError, match="BartForConditionalGeneration"):
        hf_decoder.layout(model)
    model.save_pretrained(tmp_path / "bart")
    TOKENIZER.save_pretrained(tmp_path / "bart")
    with pytest.raises(ValueError, match="'bart' encoder-decoder model; family 'decoder'"):
        fetch({"family": "decoder", "source": f"local:{tmp_path / 'bart'}"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_without_a_block_list_is_refused_naming_its_class():
    class Flat(nn.Module):
        config = None

        def get_decoder(self):
            return nn.Linear(2, 2)

    with pytest.raises(hf_decoder.UnsupportedModelError, match="Flat .* no list of"):
        hf_decoder.layout(Flat())


@pytest.mark.parametrize("family", ["decoder", "gpt2", "resnet"])
def test_auto_is_the_checkpoints_own_dtype(model_dirs, stored, tmp_path, family):
    """``auto`` loads a checkpoint stored in bfloat16 in bfloat16 (a Hugging Face one says so in
    its config), and one stored in float32 in float32; the default is float32 whatever is
    stored."""
    import json

    from safetensors.torch import load_file, save_file

    source = stored["llama"] if family == "decoder" else model_dirs[family]
    plain = tmp_path / "plain"
    plain.mkdir()
    for item in source.iterdir():
        if item.name != "manifest.json":
            (plain / item.name).write_bytes(item.read_bytes())
    weights = plain / "model.safetensors"
    half = {k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}
    save_file(half, weights, metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    if "model_type" in config:
        (plain / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    fetch({"family": family, "source": f"local:{plain}", "blocks": 2}, tmp_path / "m")
    for dtype, expected in (("auto", torch.bfloat16), (None, torch.float32)):
        adapter, _ = load_adapter(tmp_path / "m", dtype=dtype)
        assert {p.dtype for p in adapter.model.parameters()} == {expected}
    fetch({"family": family, "source": f"local:{source}", "blocks": 2}, tmp_path / "f32")
    adapter, _ = load_adapter(tmp_path / "f32", dtype="auto")
    assert {p.dtype for p in adapter.model.parameters()} == {torch.float32}


def test_gemmas_readout_zero_is_the_scaled_embedding(stored):
    """Gemma multiplies its embeddings by sqrt(width) before the first block: read-out 0 is the
    stream the first block receives, the scaled one."""
    adapter, _ = load_adapter(stored["gemma2"])
    inputs = encode(adapter)
    with torch.no_grad():
        streams = adapter.streams(inputs)
        embedded = adapter.model.get_input_embeddings().weight[inputs["input_ids"]]  # a lookup
    torch.testing.assert_close(streams[0], embedded * torch.tensor(32**0.5), rtol=1e-6, atol=0)
    assert not torch.allclose(streams[0], embedded)
