"""BERT (Hugging Face): masked LM or sentence-pair classifier."""

from workflow_scripts.families import (
    TEXT_CLASSIFIER,
    TRANSFORMER_ARCH,
    Family,
    check_transformer_arch,
    register,
    transformer_size,
)

register(
    Family(
        name="bert",
        module="workflow_scripts.models.transformers_text",
        modality="text",
        default_head=TEXT_CLASSIFIER,
        heads={"masked_lm": "BertForMaskedLM", TEXT_CLASSIFIER: "BertForSequenceClassification"},
        threshold=4,
        arch_required=TRANSFORMER_ARCH[0],
        arch_optional=TRANSFORMER_ARCH[1],
        check_arch=check_transformer_arch,
        estimate=transformer_size,
        model_types=("bert",),
        tokenizer="bert",
        trained_by=(TEXT_CLASSIFIER,),
    )
)
