"""Text transformers from Hugging Face: GPT-2, gptr2 (GPT-2 with every LayerNorm replaced by a
scalar-gain RMSNorm), RoBERTa and BERT. Building random-initialised ones, loading stored ones,
and their adapter (its read-out points: see ``workflow_scripts.models.hooked``).

What differs between these families is asked of their records: the Hugging Face model type built
(the first of ``model_types``: gptr2's is gpt2) and its config settings (``hf_config``), the heads,
where the blocks and the final norm sit (``hf_blocks``, ``hf_final_norm``) and whether the norms
are ScalarRMSNorms (``scalar_rms_norm``).
"""

from __future__ import annotations

from operator import attrgetter
from pathlib import Path

import torch
import transformers
from torch import nn

from workflow_scripts import families
from workflow_scripts.models.builtin_tokenizer import SPECIALS, builtin_tokenizer
from workflow_scripts.models.hooked import HookedTransformer, load_tokenizer, save_pretrained
from workflow_scripts.models.norms import ScalarRMSNorm
from workflow_scripts.models.placement import from_pretrained_options, refuse_split
from workflow_scripts.models.precision import hf_dtype, torch_dtype
from workflow_scripts.models.store import read_weights
from workflow_scripts.options.placement import Placement


def head_class(family: str, head: str) -> type[transformers.PreTrainedModel]:
    """The Hugging Face class that carries ``head`` on a model of ``family``."""
    heads = families.get(family).heads
    if head not in heads:
        raise ValueError(f"family {family} has no head {head!r}; choose one of {sorted(heads)}")
    return getattr(transformers, heads[head])


def use_scalar_rms_norm(model: nn.Module) -> None:
    """Replace every LayerNorm of ``model`` with a ScalarRMSNorm, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, ScalarRMSNorm(eps=child.eps))


def build(spec: dict, tokenizer) -> transformers.PreTrainedModel:
    """A random-initialised model from ``spec`` (family, arch, head, num_labels, seed) over the
    vocabulary of ``tokenizer``."""
    family = spec["family"]
    record = families.get(family)
    model_class = head_class(family, spec.get("head", record.default_head))
    ids = {
        f"{name[:-6]}_token_id": tokenizer.convert_tokens_to_ids(token)
        for name, token in SPECIALS[record.tokenizer].items()
        if name in ("bos_token", "eos_token", "pad_token")
    }
    config = transformers.AutoConfig.for_model(
        record.model_types[0],
        **record.hf_config(spec["arch"]),
        vocab_size=len(tokenizer),
        num_labels=spec.get("num_labels", 3),
        **ids,
    )
    config.residual_streams_family = family
    torch.manual_seed(spec.get("seed", 0))
    model = model_class(config)
    if record.scalar_rms_norm:
        use_scalar_rms_norm(model)
    return model.eval()


def _load_with_scalar_rms_norm(
    model_class, config, directory: str | Path, reheaded: bool, dtype: str | None
):
    """A model with ScalarRMSNorms (gptr2), which ``from_pretrained`` cannot build: its stored
    weights loaded into a model whose LayerNorms became ScalarRMSNorms (``reheaded``: the base
    model's weights only, under a newly initialised head), in ``dtype``."""
    model = model_class(config)
    use_scalar_rms_norm(model)
    state = read_weights(directory)
    prefix = model.base_model_prefix
    if not any(k.startswith(prefix + ".") for k in state):  # a base model's weights
        state = {f"{prefix}.{k}": v for k, v in state.items()}
    # GPT-2's causal-mask buffers, which checkpoints of older transformers kept
    state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = {  # a scalar gain saved as a 0-d tensor (the study's checkpoints)
        k: v.reshape(shapes[k]) if k in shapes and v.numel() == 1 == shapes[k].numel() else v
        for k, v in state.items()
    }
    if reheaded:
        state = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if reheaded:
        allowed |= {k for k in model.state_dict() if not k.startswith(prefix)}
    if unexpected or set(missing) - allowed:
        raise ValueError(
            f"{directory}: weights do not fit a model with ScalarRMSNorms "
            f"(missing {missing}, unexpected {unexpected})"
        )
    model.tie_weights()
    return model.to(torch_dtype(dtype, next(iter(state.values())).dtype))


# the family interface (see ``workflow_scripts.models``)
def init(spec: dict, tokenizer=None):
    """A random-initialised model of ``spec`` and its tokenizer: ``tokenizer``, else the
    built-in one in the family's style."""
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
    ``placement`` says (not gptr2's: its ScalarRMSNorms are not ``from_pretrained``'s); with
    ``head``, under that head instead of the stored one (a new head is randomly initialised: the
    start of a fine-tune)."""
    overrides = {} if num_labels is None else {"num_labels": num_labels}
    config = transformers.AutoConfig.from_pretrained(directory, **overrides)
    if head is None:
        # the checkpoint's own class, or (a class of its author's, as the study's "GPTR")
        # the family's default head
        model_class = getattr(transformers, (config.architectures or [""])[0], None)
        if model_class is None:
            model_class = head_class(family, families.get(family).default_head)
    else:
        model_class = head_class(family, head)
        config.architectures = [model_class.__name__]
    if families.get(family).scalar_rms_norm:
        refuse_split(placement, family)
        model = _load_with_scalar_rms_norm(model_class, config, directory, head is not None, dtype)
    else:
        model = model_class.from_pretrained(
            directory, config=config, dtype=hf_dtype(dtype), **from_pretrained_options(placement)
        )
    return model.eval(), load_tokenizer(directory)


write = save_pretrained


def adapter(model, tokenizer, family: str, final_readout: str) -> TextAdapter:
    return TextAdapter(model, tokenizer, family, final_readout)


class TextAdapter(HookedTransformer):
    """A model of one of these families, its blocks and final norm where its record says (GPT-2
    and gptr2: blocks ``h``, final norm ``ln_f``; RoBERTa and BERT: blocks ``encoder.layer``, no
    final norm)."""

    def __init__(self, model, tokenizer, family: str, final_readout: str = "raw"):
        record = families.get(family)
        base = model.base_model
        blocks = attrgetter(record.hf_blocks)(base)
        final_norm = attrgetter(record.hf_final_norm)(base) if record.hf_final_norm else None
        super().__init__(model, tokenizer, base, blocks, final_norm, final_readout)
        self.family = family
