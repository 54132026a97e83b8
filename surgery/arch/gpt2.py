"""GPT-2: fused c_attn ([q | k | v] columns of a Conv1D), Conv1D MLP c_fc -> c_proj, no GQA.

Conv1D stores its weight as (in, out): output features are columns, not rows. Every GPT-2 query head is its own
KV group.
"""

from surgery.arch.base import ArchSpec

SPEC = ArchSpec(
    family="gpt2",
    model_types=("gpt2",),
    layers="transformer.h",
    attn="attn",
    mlp="mlp",
    qkv="c_attn",
    o="c_proj",
    up="c_fc",
    down="c_proj",
    conv1d=True,
    attn_norms=("ln_1",),
    mlp_norms=("ln_2",),
    cfg_heads="n_head",
    cfg_kv_heads=None,
    cfg_mlp="n_inner",
    cfg_layers="n_layer",
    cfg_hidden="n_embd",
    cfg_mlp_default_mult=4,
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    attn_count_attrs={"heads": "num_heads", "q_width": "split_size"},
)
