"""Qwen2 family: Llama layout with biases on q/k/v (the bias rows are pruned with their heads)."""

from dataclasses import replace

from surgery.arch.llama import SPEC as LLAMA

SPEC = replace(LLAMA, family="qwen2", model_types=("qwen2",), hidden_divisible_by_heads=False)
