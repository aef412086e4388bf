"""Hugging Face decoder-only language models of the Llama shape: Llama, Qwen2, Mistral and
GPT-NeoX (Pythia), the ``decoder`` family. Building random-initialised ones, loading stored ones
(any ``save_pretrained`` directory of a supported layout), and their adapter.

Read-out points: the stream entering the first block (read-out 0, the embedding output) and the
output of every block (read-out k is the stream after k blocks), taken with hooks on the blocks
during one pass of the base model, so they are exactly what Hugging Face reports as
``hidden_states`` but the last: Hugging Face reports that one after the final norm; here it is the
raw stream unless ``final_readout="final_norm"`` (as GPT-2's in ``transformers_text``).

Models run in float32 whatever the dtype of the stored weights (``extract.autocast`` chooses a
lower precision on CUDA). Only the causal language-model head is supported.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import nn

from workflow_scripts.models.adapter import Adapter, Readout
from workflow_scripts.models.transformers_text import builtin_tokenizer

# where each supported layout keeps its blocks and final norm: (base model attribute, blocks,
# final norm); the head is ``get_output_embeddings()``
LAYOUTS = (("model", "layers", "norm"),                          # Llama, Qwen2, Mistral
           ("gpt_neox", "layers", "final_layer_norm"))           # GPT-NeoX, Pythia
# arch.type of init: models -> config class
CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "gpt_neox": "GPTNeoXConfig"}
DEFAULT_TYPE = "llama"


def layout(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """The base model, its block list and its final norm; a clear error for another layout."""
    for base_name, blocks_name, norm_name in LAYOUTS:
        base = getattr(model, base_name, None)
        blocks = getattr(base, blocks_name, None)
        norm = getattr(base, norm_name, None)
        if isinstance(blocks, nn.ModuleList) and isinstance(norm, nn.Module):
            return base, blocks, norm
    known = ", ".join(f"{b}.{l} + {b}.{n}" for b, l, n in LAYOUTS)
    raise ValueError(f"{type(model).__name__} (model_type "
                     f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}) does not "
                     f"have a decoder layout the 'decoder' family knows ({known})")


def build(spec: dict, tokenizer) -> transformers.PreTrainedModel:
    """A random-initialised causal language model from ``spec`` (arch: type, layers, width,
    heads, context; seed)."""
    arch = spec["arch"]
    kind = arch.get("type", DEFAULT_TYPE)
    if kind not in CONFIGS:
        raise ValueError(f"unknown decoder arch.type {kind!r}; choose one of {', '.join(CONFIGS)}")
    head = spec.get("head", "causal_lm")
    if head != "causal_lm":
        raise ValueError(f"family decoder has only the causal_lm head, not {head!r}")
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    heads = {} if kind == "gpt_neox" else {"num_key_value_heads": arch["heads"]}  # no grouping
    # no pad_token_id: Llama would give the padding token a zero embedding (padding_idx)
    config = getattr(transformers, CONFIGS[kind])(
        vocab_size=len(tokenizer), hidden_size=arch["width"], num_hidden_layers=arch["layers"],
        num_attention_heads=arch["heads"], intermediate_size=4 * arch["width"],
        max_position_embeddings=arch.get("context", 128), bos_token_id=eos, eos_token_id=eos,
        pad_token_id=None, tie_word_embeddings=False, **heads)
    torch.manual_seed(spec.get("seed", 0))
    return transformers.AutoModelForCausalLM.from_config(config).eval()


# the family interface (see ``workflow_scripts.models``)
def init(spec: dict):
    """A random-initialised model of ``spec`` and the built-in word-level tokenizer (GPT-2's
    special tokens: end-of-text is bos, eos and padding; a pair is concatenated)."""
    tokenizer = builtin_tokenizer("gpt2")
    return build(spec, tokenizer), tokenizer


def load(directory: str | Path, family: str, head: str | None = None,
         num_labels: int | None = None):
    """The model and tokenizer stored in ``directory``, in float32; the pad token is the eos
    token where the tokenizer has none, and padding is on the right."""
    if head not in (None, "causal_lm"):
        raise ValueError(f"family decoder has only the causal_lm head, not {head!r}")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    layout(model)  # a model of another layout fails here (at fetch), not at extraction
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer


def write(model, tokenizer, directory: str | Path) -> None:
    """``save_pretrained`` of the model and its tokenizer."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def adapter(model, tokenizer, family: str, final_readout: str) -> "DecoderAdapter":
    return DecoderAdapter(model, tokenizer, final_readout)


class SkippedBlock(nn.Module):
    """A decoder block with its residual branches removed: the stream passes unchanged.

    It returns what the block returns: the stream alone where the block returns a tensor
    (transformers 5), or a tuple of the block's length with the stream first and None after it
    where the block returns a tuple (transformers 4: ``(hidden_states, attention weights?,
    cache?)``, whose callers read element 0; a bare tensor there would be indexed by batch).
    Which one is learnt by running the block itself once, on the first call's arguments, per
    setting of the flags that change a tuple's length; ``form`` is shared by the skipped blocks of
    one model, so that happens once per model.
    """

    def __init__(self, block: nn.Module, form: dict):
        super().__init__()
        object.__setattr__(self, "block", block)  # not a submodule: no parameters, no hooks
        self.form = form

    def forward(self, *args, **kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        key = (bool(kwargs.get("output_attentions")), bool(kwargs.get("use_cache")))
        if key not in self.form:
            with torch.no_grad():
                out = self.block.forward(*args, **kwargs)  # forward: no hooks fire
            self.form[key] = len(out) if isinstance(out, tuple) else None
        length = self.form[key]
        return hidden_states if length is None else (hidden_states,) + (None,) * (length - 1)


class DecoderAdapter(Adapter):
    modality = "text"
    pooling = "none"
    head = "causal_lm"
    num_labels = None

    def __init__(self, model, tokenizer, final_readout: str = "raw"):
        super().__init__(model)
        self.tokenizer = tokenizer
        self.base, container, self.final_norm = layout(model)
        self.lm_head = model.get_output_embeddings()
        self.block_slots = [(container, i) for i in range(len(container))]
        if final_readout not in ("raw", "final_norm"):
            raise ValueError(f"final_readout must be raw or final_norm, not {final_readout!r}")
        self.final_readout = final_readout
        self._skip_form: dict = {}
        width = model.config.hidden_size
        self.readouts = [Readout(0, 0, 0, "embeddings", width)] + [
            Readout(k, 0, k, f"block.{k - 1}", width) for k in range(1, len(container) + 1)]

    def streams(self, inputs):
        captured: list[torch.Tensor] = []

        def enter(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])

        def keep(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        blocks = [container[i] for container, i in self.block_slots]  # as they stand (ablated)
        handles = [blocks[0].register_forward_pre_hook(enter, with_kwargs=True)]
        handles += [block.register_forward_hook(keep) for block in blocks]
        try:
            out = self.base(**inputs, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if self.final_readout == "final_norm":
            captured[-1] = out.last_hidden_state
        return captured

    def forward(self, inputs):
        return self.base(**inputs, use_cache=False).last_hidden_state

    def logits(self, inputs):
        return self.model(**inputs, use_cache=False).logits

    def without_branch(self, block):
        return SkippedBlock(block, self._skip_form)

    def blocks_applied(self, readout: int) -> int:
        return readout
