"""Hugging Face decoder-only language models, the ``decoder`` family: any causal LM whose blocks
add to one residual stream (Llama, Qwen, Mistral, Gemma, OLMo, Phi, the mixtures of experts,
GPT-NeoX, OPT, Falcon, BLOOM, GPT-J, ...). Building random-initialised ones, loading stored ones
(any ``save_pretrained`` directory), and their adapter (its read-out points: see
``workflow_scripts.models.hooked``).

Where the blocks and the final norm sit is read from the loaded model itself, not from a table
of model types (:func:`layout`). Models load and run in the dtype asked for (``models.<name>.
dtype``; float32 by default). Only the causal language-model head is supported.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import nn

from workflow_scripts import families
from workflow_scripts.models.builtin_tokenizer import builtin_tokenizer
from workflow_scripts.models.hooked import HookedTransformer, load_tokenizer, save_pretrained
from workflow_scripts.models.placement import from_pretrained_options, input_device
from workflow_scripts.models.precision import hf_dtype
from workflow_scripts.options.placement import Placement
from workflow_scripts.stage import InputError

# arch.type of init: models -> config class
CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "gpt_neox": "GPTNeoXConfig"}
DEFAULT_TYPE = "llama"


class UnsupportedModelError(InputError):
    """A checkpoint whose layout is not one residual stream through a list of blocks."""


def _refuse(model: nn.Module, why: str) -> UnsupportedModelError:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return UnsupportedModelError(
        f"{type(model).__name__} (model_type {model_type!r}) cannot be read by the 'decoder' "
        f"family: {why}"
    )


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's own, or a class named like one (LlamaRMSNorm, ...)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def layout(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module | None]:
    """The decoder of ``model`` (its ``get_decoder()``), its block list and its final norm (None
    where it has none), found on the model itself:

    - the blocks are the shallowest ``nn.ModuleList`` of the decoder with one block per hidden
      layer (the text config's ``num_hidden_layers``), all of one class;
    - the final norm is the decoder's own norm layer (a direct child, outside the blocks) that
      runs after the last block; where it has several (BLOOM also normalises its embeddings),
      the one that a one-token forward calls after the last block.

    Encoder-decoder models, and models with no such block list, are refused naming the class.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(model, "it is an encoder-decoder model; only decoder-only models are")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    text = config.get_text_config() if config is not None else None
    layers = getattr(text, "num_hidden_layers", None)
    candidates = [
        (name.count("."), name, module)
        for name, module in decoder.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (layers is None or len(module) == layers)
        and len({type(block) for block in module}) == 1
    ]
    if not candidates:
        raise _refuse(model, f"its decoder has no list of {layers} blocks of one class")
    depth, _, blocks = min(candidates, key=lambda c: c[:2])
    if layers is None and sum(c[0] == depth for c in candidates) > 1:
        raise _refuse(model, "its decoder has several block lists at the same depth")
    norms = [module for module in decoder.children() if module is not blocks and _is_norm(module)]
    if len(norms) > 1:
        norms = [_run_after(model, blocks[-1], norms)]
    return decoder, blocks, (norms[0] if norms else None)


def _run_after(model: nn.Module, last_block: nn.Module, norms: list[nn.Module]) -> nn.Module:
    """Of ``norms``, the first that a one-token forward of ``model`` calls after ``last_block``
    (the whole model's forward: a model offloaded by accelerate as one piece loads its weights
    there)."""
    order: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda m, a, o: order.append(m)) for m in norms]
    handles.append(last_block.register_forward_hook(lambda m, a, o: order.append(m)))
    device = input_device(model)
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    after = order[order.index(last_block) + 1 :] if last_block in order else []
    if not after:
        raise _refuse(model, "none of its norm layers runs after its last block")
    return after[0]


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
    directory: str | Path,
    family: str,
    head: str | None = None,
    num_labels: int | None = None,
    dtype: str | None = None,
    placement: Placement | None = None,
):
    """The model and tokenizer stored in ``directory``, in ``dtype`` (float32 by default; see
    ``workflow_scripts.models.precision``), whole on the CPU or split over devices as
    ``placement`` says; the pad token is the eos token where the tokenizer has none, and padding
    is on the right."""
    check_head(head)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=hf_dtype(dtype), **from_pretrained_options(placement)
    )
    layout(model)  # a model of another layout fails here (at fetch), not at extraction
    return model.eval(), load_tokenizer(directory)


write = save_pretrained


def adapter(model, tokenizer, family: str, final_readout: str) -> DecoderAdapter:
    return DecoderAdapter(model, tokenizer, final_readout)


class DecoderAdapter(HookedTransformer):
    """A decoder-only causal language model (its layout: see :func:`layout`)."""

    def __init__(self, model, tokenizer, final_readout: str = "raw"):
        base, blocks, final_norm = layout(model)
        super().__init__(model, tokenizer, base, blocks, final_norm, final_readout)
        self.head = "causal_lm"  # whatever the class is named (Gemma3ForConditionalGeneration)
        self.lm_head = model.get_output_embeddings()

    def output_weights(self, readout):
        """The unembedding, where it reads the stream itself (after the final norm); None where
        a projection stands between them (OPT-350m's ``project_out``)."""
        if self.lm_head.weight.shape[1] != self.readouts[readout].width:
            return None
        return super().output_weights(readout)
