"""Qwen3 family: Llama layout plus q_norm/k_norm. Those norms act on head_dim and are shared by all heads of a
layer, so head pruning leaves them untouched."""

from dataclasses import replace

from surgery.arch.llama import SPEC as LLAMA

SPEC = replace(LLAMA, family="qwen3", model_types=("qwen3",), hidden_divisible_by_heads=False)
