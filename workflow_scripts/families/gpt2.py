"""GPT-2 (Hugging Face): causal LM or sentence-pair classifier."""

from workflow_scripts.families import TEXT_CLASSIFIER, register, text_transformer

HEADS = {"causal_lm": "GPT2LMHeadModel", TEXT_CLASSIFIER: "GPT2ForSequenceClassification"}

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
    )
)
