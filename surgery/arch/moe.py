"""Mixture-of-experts families with Llama-style attention: Qwen3-MoE and Mixtral.

In transformers 5 the experts of a layer are fused 3-D Parameters on `mlp.experts` (`gate_up_proj`
(E, 2 * width, hidden) and `down_proj` (E, hidden, width)) and the router is `mlp.gate` (`weight` (E, hidden));
both hold `num_experts`, which their forward reads. Qwen3MoeConfig maps `num_experts` to `num_local_experts` and
saves that (hub config.json files say `num_experts`: shapes reads either). Qwen3-MoE layers listed in `mlp_only_layers` (or off the
`decoder_sparse_step`) keep a dense MLP.
"""

from dataclasses import replace

from surgery.arch.llama import SPEC as LLAMA

_MOE = dict(hidden_prunable=False, hidden_divisible_by_heads=False, experts="experts", router="gate")

QWEN3_MOE = replace(LLAMA, family="qwen3_moe", model_types=("qwen3_moe",), cfg_experts="num_local_experts", **_MOE)
# Mixtral checkpoints name the block `block_sparse_moe` and the experts' Linears w1/w3 (gate, up) and w2 (down)
MIXTRAL = replace(LLAMA, family="mixtral", model_types=("mixtral",), cfg_experts="num_local_experts",
                  moe_on_disk="block_sparse_moe", expert_linears=("w1", "w3", "w2"), **_MOE)
