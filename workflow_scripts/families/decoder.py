"""Hugging Face decoder-only causal LMs of the Llama shape (Llama, Qwen2, Mistral, GPT-NeoX);
``arch.type`` picks an ``init:`` model's layout."""

from workflow_scripts.families import (
    TRANSFORMER_ARCH,
    Family,
    check_transformer_arch,
    register,
    transformer_size,
)

register(
    Family(
        name="decoder",
        module="workflow_scripts.models.hf_decoder",
        modality="text",
        default_head="causal_lm",
        heads={"causal_lm": "AutoModelForCausalLM"},
        threshold=10,
        arch_required=TRANSFORMER_ARCH[0],
        arch_optional=(*TRANSFORMER_ARCH[1], "type"),
        check_arch=check_transformer_arch,
        estimate=transformer_size,
        model_types=("llama", "qwen2", "gpt_neox", "mistral"),
        tokenizer="gpt2",
    )
)
