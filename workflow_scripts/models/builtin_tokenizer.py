"""The built-in word-level tokenizer: the closed vocabulary of the built-in text sets with the
special tokens of one tokenizer style (a family's ``tokenizer`` in ``workflow_scripts.families``).

Pairs are joined as the style's own tokenizer joins them: GPT-2 concatenates, RoBERTa writes
``<s> A </s></s> B </s>``, BERT ``[CLS] A [SEP] B [SEP]`` with segment ids.
"""

from __future__ import annotations

import transformers
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

from workflow_scripts.data.vocabulary import vocabulary

# the special tokens of each style, in vocabulary order
SPECIALS = {
    "gpt2": {
        "unk_token": "<unk>",
        "eos_token": "<|endoftext|>",
        "bos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    },
    "roberta": {
        "bos_token": "<s>",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "cls_token": "<s>",
        "sep_token": "</s>",
    },
    "bert": {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    },
}


def builtin_tokenizer(style: str) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the built-in vocabulary with the special tokens and pair
    template of ``style`` (gpt2, roberta or bert), padding on the right."""
    if style not in SPECIALS:
        raise ValueError(f"unknown tokenizer style {style!r}; choose one of {', '.join(SPECIALS)}")
    specials = SPECIALS[style]
    ordered = list(dict.fromkeys(specials.values()))
    vocab = {token: i for i, token in enumerate(ordered + vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "roberta":
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", vocab["</s>"]), ("<s>", vocab["<s>"])
        )
    elif style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if style == "bert" else [])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, model_input_names=input_names, padding_side="right", **specials
    )
