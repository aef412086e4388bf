"""Hugging Face decoder-only causal LMs: any model_type whose blocks add to one residual stream
(Llama, Qwen, Mistral, Gemma, OLMo, Phi, Mixtral, OLMoE, GPT-NeoX, OPT, Falcon, BLOOM, GPT-J, ...;
``workflow_scripts.models.hf_decoder`` finds the blocks on the loaded model). Encoder-decoder
checkpoints are refused. ``arch.type`` picks an ``init:`` model's layout."""

from workflow_scripts.families import TRANSFORMER_ARCH, register, text_transformer

register(
    text_transformer(
        name="decoder",
        module="workflow_scripts.models.hf_decoder",
        default_head="causal_lm",
        heads={"causal_lm": "AutoModelForCausalLM"},
        threshold=10,
        arch_optional=(*TRANSFORMER_ARCH[1], "type"),
        decoder_only=True,
        tokenizer="gpt2",
    )
)
