"""GPT-2 (Hugging Face): causal LM or sentence-pair classifier."""

from workflow_scripts.families import (
    TEXT_CLASSIFIER,
    TRANSFORMER_ARCH,
    Family,
    check_transformer_arch,
    register,
    transformer_size,
)

HEADS = {"causal_lm": "GPT2LMHeadModel", TEXT_CLASSIFIER: "GPT2ForSequenceClassification"}

GPT2 = register(
    Family(
        name="gpt2",
        module="workflow_scripts.models.transformers_text",
        modality="text",
        default_head="causal_lm",
        heads=HEADS,
        threshold=10,
        arch_required=TRANSFORMER_ARCH[0],
        arch_optional=TRANSFORMER_ARCH[1],
        check_arch=check_transformer_arch,
        estimate=transformer_size,
        model_types=("gpt2",),
        tokenizer="gpt2",
        trained_by=("causal_lm", TEXT_CLASSIFIER),
    )
)
