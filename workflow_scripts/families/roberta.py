"""RoBERTa (Hugging Face): masked LM or sentence-pair classifier."""

from functools import partial

from workflow_scripts.families import TEXT_CLASSIFIER, encoder_config, register, text_transformer

register(
    text_transformer(
        name="roberta",
        module="workflow_scripts.models.transformers_text",
        default_head=TEXT_CLASSIFIER,
        heads={
            "masked_lm": "RobertaForMaskedLM",
            TEXT_CLASSIFIER: "RobertaForSequenceClassification",
        },
        threshold=4,
        model_types=("roberta",),
        tokenizer="roberta",
        trained_by=(TEXT_CLASSIFIER,),
        hf_config=partial(encoder_config, position_offset=2, token_types=1),
        hf_blocks="encoder.layer",
    )
)
