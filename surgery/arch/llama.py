"""Llama family: Llama 2/3, SmolLM2, Mistral (separate q/k/v/o, gated MLP, GQA)."""

from surgery.arch.base import ArchSpec

SPEC = ArchSpec(
    family="llama",
    model_types=("llama", "mistral"),
    layers="model.layers",
    attn="self_attn",
    mlp="mlp",
    q="q_proj",
    k="k_proj",
    v="v_proj",
    o="o_proj",
    gate="gate_proj",
    up="up_proj",
    down="down_proj",
    attn_norms=("input_layernorm",),
    mlp_norms=("post_attention_layernorm",),
    attn_count_attrs={"kv_groups": "num_key_value_groups"},
    hidden_prunable=True,
    hidden_divisible_by_heads=True,
)
