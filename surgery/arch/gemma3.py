"""Gemma 3 (text): Llama layout with a norm before and after each sub-block and sliding/full layer types."""

from dataclasses import replace

from surgery.arch.llama import SPEC as LLAMA

SPEC = replace(
    LLAMA,
    family="gemma3",
    model_types=("gemma3_text",),
    attn_norms=("input_layernorm", "post_attention_layernorm"),
    mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    hidden_prunable=False,  # embeddings scaled by sqrt(hidden_size), norms are (1 + w): not handled yet
)
