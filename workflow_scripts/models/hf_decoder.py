"""Hugging Face decoder-only language models of the Llama shape: Llama, Qwen2, Mistral and
GPT-NeoX (Pythia), the ``decoder`` family. Building random-initialised ones, loading stored ones
(any ``save_pretrained`` directory of a supported layout), and their adapter (its read-out
points: see ``workflow_scripts.models.hooked``).

Models run in float32 whatever the dtype of the stored weights (``extract.autocast`` chooses a
lower precision on CUDA). Only the causal language-model head is supported.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import nn

from workflow_scripts import families
from workflow_scripts.models.builtin_tokenizer import builtin_tokenizer
from workflow_scripts.models.hooked import HookedTransformer, load_tokenizer, save_pretrained

# where each supported layout keeps its blocks and final norm: (base model attribute, blocks,
# final norm); the head is ``get_output_embeddings()``
LAYOUTS = (
    ("model", "layers", "norm"),  # Llama, Qwen2, Mistral
    ("gpt_neox", "layers", "final_layer_norm"),
)  # GPT-NeoX, Pythia
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
    known = ", ".join(f"{base}.{blocks} + {base}.{norm}" for base, blocks, norm in LAYOUTS)
    raise ValueError(
        f"{type(model).__name__} (model_type "
        f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}) does not "
        f"have a decoder layout the 'decoder' family knows ({known})"
    )


def check_head(head: str | None) -> None:
    """Refuse any head but the causal language-model one (None: the default)."""
    if head not in (None, "causal_lm"):
        raise ValueError(f"family decoder has only the causal_lm head, not {head!r}")


def build(spec: dict, tokenizer) -> transformers.PreTrainedModel:
    """A random-initialised causal language model from ``spec`` (arch: type, layers, width,
    heads, context; seed)."""
    arch = spec["arch"]
    kind = arch.get("type", DEFAULT_TYPE)
    if kind not in CONFIGS:
        raise ValueError(f"unknown decoder arch.type {kind!r}; choose one of {', '.join(CONFIGS)}")
    check_head(spec.get("head"))
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    heads = {} if kind == "gpt_neox" else {"num_key_value_heads": arch["heads"]}  # no grouping
    # no pad_token_id: Llama would give the padding token a zero embedding (padding_idx)
    config = getattr(transformers, CONFIGS[kind])(
        vocab_size=len(tokenizer),
        hidden_size=arch["width"],
        num_hidden_layers=arch["layers"],
        num_attention_heads=arch["heads"],
        intermediate_size=4 * arch["width"],
        max_position_embeddings=arch.get("context", 128),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=None,
        tie_word_embeddings=False,
        **heads,
    )
    torch.manual_seed(spec.get("seed", 0))
    return transformers.AutoModelForCausalLM.from_config(config).eval()


# the family interface (see ``workflow_scripts.models``)
def init(spec: dict, tokenizer=None):
    """A random-initialised model of ``spec`` and its tokenizer: ``tokenizer``, else the
    built-in one in the family's style (GPT-2's: end-of-text is bos, eos and padding; a pair is
    concatenated)."""
    if tokenizer is None:
        tokenizer = builtin_tokenizer(families.get(spec["family"]).tokenizer)
    return build(spec, tokenizer), tokenizer


def load(
    directory: str | Path, family: str, head: str | None = None, num_labels: int | None = None
):
    """The model and tokenizer stored in ``directory``, in float32; the pad token is the eos
    token where the tokenizer has none, and padding is on the right."""
    check_head(head)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    layout(model)  # a model of another layout fails here (at fetch), not at extraction
    return model.eval(), load_tokenizer(directory)


write = save_pretrained


def adapter(model, tokenizer, family: str, final_readout: str) -> DecoderAdapter:
    return DecoderAdapter(model, tokenizer, final_readout)


class DecoderAdapter(HookedTransformer):
    """A decoder of one of the supported layouts (see :func:`layout`)."""

    def __init__(self, model, tokenizer, final_readout: str = "raw"):
        base, blocks, final_norm = layout(model)
        super().__init__(model, tokenizer, base, blocks, final_norm, final_readout)
        self.lm_head = model.get_output_embeddings()
