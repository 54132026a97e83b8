"""Phi-3: fused qkv_proj ([q | k | v] rows) and fused gate_up_proj ([gate | up] rows).

Phi3Attention slices its fused projection with `self.config.num_attention_heads`, so a layer whose head count
differs from the global config gets its own config copy (`per_module_config`).
"""

from surgery.arch.base import ArchSpec

SPEC = ArchSpec(
    family="phi3",
    model_types=("phi3",),
    layers="model.layers",
    attn="self_attn",
    mlp="mlp",
    qkv="qkv_proj",
    o="o_proj",
    gate_up="gate_up_proj",
    down="down_proj",
    up="gate_up_proj",
    attn_norms=("input_layernorm",),
    mlp_norms=("post_attention_layernorm",),
    per_module_config=True,
    attn_count_attrs={"kv_groups": "num_key_value_groups", "kv_heads": "num_key_value_heads"},
)
