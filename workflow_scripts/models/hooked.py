"""Hugging Face transformers read with hooks: the base of the text and decoder adapters, and
what the two families store and load alike (``save_pretrained`` files, the tokenizer).

Read-out points: the stream entering the first block (read-out 0, the embedding output) and the
output of every block (read-out k is the stream after k blocks), taken with hooks on the blocks
during one pass of the base model, so they are exactly what Hugging Face reports as
``hidden_states``, but the last: where the model has a final norm, Hugging Face reports that one
after it; here it is the raw stream unless ``final_readout="final_norm"``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import nn

from workflow_scripts.models.adapter import Adapter, Readout

FINAL_READOUTS = ("raw", "final_norm")
# the head of a model, from the suffix of its Hugging Face class name
HEAD_SUFFIXES = (
    ("ForSequenceClassification", "sequence_classification"),
    ("LMHeadModel", "causal_lm"),
    ("ForCausalLM", "causal_lm"),
    ("ForMaskedLM", "masked_lm"),
)


class SkippedBlock(nn.Module):
    """A transformer block with its residual branches removed: the stream passes unchanged.

    It returns what the block returns: the stream alone where the block returns a tensor
    (transformers 5), or a tuple of the block's length with the stream first and None after it
    where the block returns a tuple (transformers 4: ``(hidden_states, attention weights?,
    cache?)``, whose callers read element 0; a bare tensor there would be indexed by batch).
    Which one is learnt by running the block itself once, on the first call's arguments, per
    setting of the flags that change a tuple's length; ``form`` is shared by the skipped blocks
    of one model, so that happens once per model.
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


def save_pretrained(model, tokenizer, directory: str | Path) -> None:
    """``save_pretrained`` of a model and its tokenizer."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_tokenizer(directory: str | Path) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer stored in ``directory``, padding on the right; one without a pad token pads
    with its end-of-sequence token (GPT-2's end-of-text, as the study did)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def head_of(model: nn.Module) -> str:
    """The kind of output of a Hugging Face model, from its class name ("none": a bare model)."""
    name = type(model).__name__
    return next((head for suffix, head in HEAD_SUFFIXES if name.endswith(suffix)), "none")


class HookedTransformer(Adapter):
    """A Hugging Face transformer whose blocks sit in ``blocks``, a module list of its base
    model ``base``, followed by ``final_norm`` (None where the base model has none).

    Subclasses say where those are and call this ``__init__``. Every call runs without a cache.
    """

    modality = "text"
    pooling = "none"

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        base: nn.Module,
        blocks: nn.ModuleList,
        final_norm: nn.Module | None,
        final_readout: str = "raw",
    ):
        if final_readout not in FINAL_READOUTS:
            raise ValueError(f"final_readout must be raw or final_norm, not {final_readout!r}")
        super().__init__(model)
        self.tokenizer = tokenizer
        self.base = base
        self.final_norm = final_norm
        self.final_readout = final_readout
        self.block_slots = [(blocks, i) for i in range(len(blocks))]
        self.head = head_of(model)
        classifier = self.head == "sequence_classification"
        self.num_labels = model.config.num_labels if classifier else None
        names = [str(model.config.id2label.get(i, "")) for i in range(self.num_labels or 0)]
        # class names where the checkpoint has real ones (not Hugging Face's LABEL_0, ...)
        generic = [f"LABEL_{i}" for i in range(len(names))]
        self.label_names = names if names and names != generic else None
        width = model.config.get_text_config().hidden_size
        self.readouts = [Readout(0, 0, 0, "embeddings", width)] + [
            Readout(k, 0, k, f"block.{k - 1}", width) for k in range(1, len(blocks) + 1)
        ]
        self._skip_form: dict = {}  # what the skipped blocks of this model return

    def streams(self, inputs):
        captured: list[torch.Tensor] = []

        def enter(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])

        def leave(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        blocks = [container[i] for container, i in self.block_slots]  # as they stand (ablated)
        handles = [blocks[0].register_forward_pre_hook(enter, with_kwargs=True)]
        handles += [block.register_forward_hook(leave) for block in blocks]
        try:
            out = self.base(**inputs, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if self.final_readout == "final_norm" and self.final_norm is not None:
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

    def output_weights(self, readout):
        """A causal language model's unembedding, which reads every read-out point (after the
        final norm); of a split model, a copy on the CPU (offloaded weights are read in)."""
        if self.head != "causal_lm":
            return None
        unembedding = self.model.get_output_embeddings()
        if not self.split:
            return "token", unembedding.weight.detach()
        from accelerate.utils import align_module_device

        with align_module_device(unembedding, torch.device("cpu")):
            return "token", unembedding.weight.detach().cpu()
