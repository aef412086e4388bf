"""GPT-2 (Hugging Face): causal LM or sentence-pair classifier."""

from collections.abc import Mapping

from workflow_scripts.families import TEXT_CLASSIFIER, register, text_transformer

HEADS = {"causal_lm": "GPT2LMHeadModel", TEXT_CLASSIFIER: "GPT2ForSequenceClassification"}


def gpt2_config(arch: Mapping) -> dict:
    """The GPT2Config settings of a model of ``arch``."""
    return {
        "n_positions": arch.get("context", 128),
        "n_embd": arch["width"],
        "n_layer": arch["layers"],
        "n_head": arch["heads"],
    }


GPT2 = register(
    text_transformer(
        name="gpt2",
        module="workflow_scripts.models.transformers_text",
        default_head="causal_lm",
        heads=HEADS,
        threshold=10,
        model_types=("gpt2",),
        tokenizer="gpt2",
        trained_by=("causal_lm", TEXT_CLASSIFIER),
        hf_config=gpt2_config,
        hf_blocks="h",
        hf_final_norm="ln_f",
    )
)
