"""Text transformers from Hugging Face: GPT-2, gptr2 (GPT-2 with scalar-gain RMSNorm),
RoBERTa and BERT. Building random-initialised ones, loading stored ones, and their adapter.

Read-out points: the embedding output (read-out 0) and the output of every block (read-out k is
the stream after k blocks), taken with forward hooks during one pass of the base model, so they
are exactly what Hugging Face reports as ``hidden_states``. The one exception is GPT-2's last
point: Hugging Face reports it after the final LayerNorm; here it is the raw stream unless
``final_readout="final_norm"``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from torch import nn

from workflow_scripts.data import builtin
from workflow_scripts.models.adapter import Adapter, Readout
from workflow_scripts.models.store import WEIGHTS
from workflow_scripts.sources import model_head

HEAD_CLASSES = {
    "gpt2": {"causal_lm": "GPT2LMHeadModel",
             "sequence_classification": "GPT2ForSequenceClassification"},
    "roberta": {"masked_lm": "RobertaForMaskedLM",
                "sequence_classification": "RobertaForSequenceClassification"},
    "bert": {"masked_lm": "BertForMaskedLM",
             "sequence_classification": "BertForSequenceClassification"},
}

# special tokens of the built-in word-level tokenizer, per family, in vocabulary order
SPECIALS = {
    "gpt2": {"unk_token": "<unk>", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
             "pad_token": "<|endoftext|>"},
    "roberta": {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>",
                "unk_token": "<unk>", "mask_token": "<mask>", "cls_token": "<s>",
                "sep_token": "</s>"},
    "bert": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
             "sep_token": "[SEP]", "mask_token": "[MASK]"},
}


def _architecture_family(family: str) -> str:
    return "gpt2" if family == "gptr2" else family


class ScalarRMSNorm(nn.Module):
    """RMSNorm with one scalar gain and no bias: it commutes with rotations of the stream,
    so it gives no basis direction a privileged role (the study's gptr2)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def use_scalar_rms_norm(model: nn.Module) -> None:
    """Replace every LayerNorm of ``model`` with a ScalarRMSNorm, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, ScalarRMSNorm(child.eps))


def builtin_tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the built-in vocabulary with the family's special tokens.

    Pairs are joined as the family's own tokenizer joins them: GPT-2 concatenates, RoBERTa
    writes ``<s> A </s></s> B </s>``, BERT ``[CLS] A [SEP] B [SEP]`` with segment ids.
    """
    group = _architecture_family(family)
    specials = SPECIALS[group]
    ordered = list(dict.fromkeys(specials.values()))
    vocab = {token: i for i, token in enumerate(ordered + builtin.vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if group == "roberta":
        tok.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]),
                                                          ("<s>", vocab["<s>"]))
    elif group == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if group == "bert" else [])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=input_names,
                                                padding_side="right", **specials)


def build(spec: dict, tokenizer) -> transformers.PreTrainedModel:
    """A random-initialised model from ``spec`` (family, arch, head, num_labels, seed)."""
    family, arch = spec["family"], spec["arch"]
    group = _architecture_family(family)
    head = model_head(spec)
    if head not in HEAD_CLASSES[group]:
        raise ValueError(f"family {family} has no head {head!r}; "
                         f"choose one of {sorted(HEAD_CLASSES[group])}")
    context = arch.get("context", 128)
    ids = {f"{name[:-6]}_token_id": tokenizer.convert_tokens_to_ids(token)
           for name, token in SPECIALS[group].items() if name in ("bos_token", "eos_token", "pad_token")}
    common = dict(vocab_size=len(tokenizer), num_labels=spec.get("num_labels", 3), **ids)
    if group == "gpt2":
        config = transformers.GPT2Config(n_positions=context, n_embd=arch["width"],
                                         n_layer=arch["layers"], n_head=arch["heads"], **common)
    else:
        config_class = transformers.RobertaConfig if group == "roberta" else transformers.BertConfig
        config = config_class(hidden_size=arch["width"], num_hidden_layers=arch["layers"],
                              num_attention_heads=arch["heads"],
                              intermediate_size=4 * arch["width"],
                              max_position_embeddings=context + (2 if group == "roberta" else 0),
                              type_vocab_size=1 if group == "roberta" else 2, **common)
    config.residual_streams_family = family
    torch.manual_seed(spec.get("seed", 0))
    model = getattr(transformers, HEAD_CLASSES[group][head])(config)
    if family == "gptr2":
        use_scalar_rms_norm(model)
    return model.eval()


def load(directory: str | Path, family: str, head: str | None = None, num_labels: int | None = None):
    """The model and tokenizer stored in ``directory``; with ``head``, under that head instead
    of the stored one (a new head is randomly initialised: the start of a fine-tune)."""
    overrides = {} if num_labels is None else {"num_labels": num_labels}
    config = transformers.AutoConfig.from_pretrained(directory, **overrides)
    model_class = getattr(transformers, config.architectures[0])
    if head is not None:
        model_class = getattr(transformers, HEAD_CLASSES[_architecture_family(family)][head])
        config.architectures = [model_class.__name__]
    if family == "gptr2":
        model = model_class(config)
        use_scalar_rms_norm(model)
        state = load_file(Path(directory, WEIGHTS))
        if head is not None:  # the base model's weights under another head
            prefix = model.base_model_prefix + "."
            state = {k: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if head is not None:
            allowed |= {k for k in model.state_dict() if not k.startswith(model.base_model_prefix)}
        if unexpected or set(missing) - allowed:
            raise ValueError(f"{directory}: weights do not fit a gptr2 model "
                             f"(missing {missing}, unexpected {unexpected})")
        model.tie_weights()
    else:
        model = model_class.from_pretrained(directory, config=config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:  # GPT-2 pads with its end-of-text token, as the study did
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer


# the family interface (see ``workflow_scripts.models``)
def init(spec: dict, tokenizer=None):
    """A random-initialised model of ``spec`` and its tokenizer (default the built-in one)."""
    tokenizer = tokenizer or builtin_tokenizer(spec["family"])
    return build(spec, tokenizer), tokenizer


def write(model, tokenizer, directory: str | Path) -> None:
    """``save_pretrained`` of the model and its tokenizer."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def adapter(model, tokenizer, family: str, final_readout: str) -> "TextAdapter":
    return TextAdapter(model, tokenizer, family, final_readout)


class SkippedBlock(nn.Module):
    """A transformer block with its residual branches removed: the stream passes unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _head(model) -> str:
    name = type(model).__name__
    for suffix, head in (("ForSequenceClassification", "sequence_classification"),
                         ("LMHeadModel", "causal_lm"), ("ForCausalLM", "causal_lm"),
                         ("ForMaskedLM", "masked_lm")):
        if name.endswith(suffix):
            return head
    return "none"


class TextAdapter(Adapter):
    modality = "text"
    pooling = "none"

    def __init__(self, model, tokenizer, family: str, final_readout: str = "raw"):
        super().__init__(model)
        self.tokenizer = tokenizer
        self.family = family
        self.base = model.base_model
        if _architecture_family(family) == "gpt2":
            self.embedding, container = self.base.drop, self.base.h
            self.final_norm = self.base.ln_f
        else:
            self.embedding, container = self.base.embeddings, self.base.encoder.layer
            self.final_norm = None
        self.blocks = list(container)
        self.block_slots = [(container, i) for i in range(len(container))]
        self.head = _head(model)
        self.num_labels = model.config.num_labels if self.head == "sequence_classification" else None
        names = [str(model.config.id2label.get(i, "")) for i in range(self.num_labels or 0)]
        # class names where the checkpoint has real ones (not Hugging Face's LABEL_0, ...)
        self.label_names = names if names and names != [f"LABEL_{i}" for i in range(len(names))] else None
        if final_readout not in ("raw", "final_norm"):
            raise ValueError(f"final_readout must be raw or final_norm, not {final_readout!r}")
        self.final_readout = final_readout
        width = model.config.hidden_size
        self.readouts = [Readout(0, 0, 0, "embeddings", width)] + [
            Readout(k, 0, k, f"block.{k - 1}", width) for k in range(1, len(self.blocks) + 1)]

    def streams(self, inputs):
        captured: list[torch.Tensor] = []

        def keep(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handles = [m.register_forward_hook(keep) for m in [self.embedding, *self.blocks]]
        try:
            out = self.base(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        if self.final_readout == "final_norm" and self.final_norm is not None:
            captured[-1] = out.last_hidden_state
        return captured

    def forward(self, inputs):
        return self.base(**inputs).last_hidden_state

    def logits(self, inputs):
        return self.model(**inputs, use_cache=False).logits if self.head == "causal_lm" \
            else self.model(**inputs).logits

    def without_branch(self, block):
        return SkippedBlock()

    def blocks_applied(self, readout: int) -> int:
        return readout
