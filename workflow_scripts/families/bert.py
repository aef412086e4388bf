"""BERT (Hugging Face): masked LM or sentence-pair classifier."""

from functools import partial

from workflow_scripts.families import TEXT_CLASSIFIER, encoder_config, register, text_transformer

register(
    text_transformer(
        name="bert",
        module="workflow_scripts.models.transformers_text",
        default_head=TEXT_CLASSIFIER,
        heads={"masked_lm": "BertForMaskedLM", TEXT_CLASSIFIER: "BertForSequenceClassification"},
        threshold=4,
        model_types=("bert",),
        tokenizer="bert",
        trained_by=(TEXT_CLASSIFIER,),
        hf_config=partial(encoder_config, position_offset=0, token_types=2),
        hf_blocks="encoder.layer",
    )
)
