"""Hugging Face decoder-only causal LMs of the Llama shape (Llama, Qwen2, Mistral, GPT-NeoX);
``arch.type`` picks an ``init:`` model's layout."""

from workflow_scripts.families import TRANSFORMER_ARCH, register, text_transformer

register(
    text_transformer(
        name="decoder",
        module="workflow_scripts.models.hf_decoder",
        default_head="causal_lm",
        heads={"causal_lm": "AutoModelForCausalLM"},
        threshold=10,
        arch_optional=(*TRANSFORMER_ARCH[1], "type"),
        model_types=("llama", "qwen2", "gpt_neox", "mistral"),
        tokenizer="gpt2",
    )
)
