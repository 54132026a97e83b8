"""Scores for the two newer axes: residual channels (prune_hidden) and MoE experts (prune_experts).

Not yet in the method registry (surgery.importance.methods) or score files: these are the library functions, one
forward pass per batch, that `workbench score` will call once the score file has channel and expert targets.

- channel_norm_scores (Minitron, Muralidharan et al. 2024): for channel c, the sum over every hidden-size norm
  (each layer's attention and MLP norms, the final norm) of the mean over tokens of |norm output[c]|.
- expert_scores: per MoE layer and expert e, `frequency` = the fraction of tokens whose top-k holds e, and `reap`
  (REAP, Lasby et al. 2025) = the mean over the tokens routed to e of gate weight x ||expert e's output||_2
  (0 for an expert no token picked).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from surgery.arch import spec_for_config
from surgery.errors import UserError
from surgery.ops import get_module


def _hidden_norms(model: nn.Module) -> list[nn.Module]:
    spec = spec_for_config(model.config)
    norms = [get_module(layer, name) for layer in get_module(model, spec.layers)
             for name in (*spec.attn_norms, *spec.mlp_norms)]
    return [n for n in (*norms, get_module(model, spec.final_norm)) if not isinstance(n, nn.Identity)]


@torch.no_grad()
def channel_norm_scores(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """(hidden,) Minitron channel importance over the token-id `batches` (see the module docstring)."""
    norms = _hidden_norms(model)
    sums = [None] * len(norms)
    tokens = 0

    def hook(i):
        def add(_module, _args, out):
            a = out.detach().abs().reshape(-1, out.shape[-1]).sum(0, dtype=torch.float64)
            sums[i] = a if sums[i] is None else sums[i] + a
        return add

    handles = [n.register_forward_hook(hook(i)) for i, n in enumerate(norms)]
    try:
        for ids in batches:
            model(ids)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    if not tokens:
        raise UserError("channel scores need at least one batch of calibration tokens")
    return sum(s / tokens for s in sums).float()


def _expert_output(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `e` of a fused transformers-5 experts module applied to tokens `x` (N, hidden), unweighted."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


@torch.no_grad()
def expert_scores(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {"frequency": (E,), "reap": (E,)}} for every MoE layer of `model` (see the module docstring)."""
    spec = spec_for_config(model.config)
    if not spec.cfg_experts:
        raise UserError(f"expert scores need a mixture-of-experts model; this {spec.family} model has no experts")
    stats: dict[int, dict[str, torch.Tensor]] = {}
    tokens = {"n": 0}
    handles = []
    for i, layer in enumerate(get_module(model, spec.layers)):
        mlp = get_module(layer, spec.mlp)
        if not hasattr(mlp, spec.router):
            continue  # a dense layer (Qwen3-MoE mlp_only_layers)
        router, experts = get_module(mlp, spec.router), get_module(mlp, spec.experts)
        n = experts.num_experts
        stats[i] = {"count": torch.zeros(n, dtype=torch.float64), "reap": torch.zeros(n, dtype=torch.float64)}

        def hook(_module, args, out, i=i, experts=experts, n=n):
            x = args[0].reshape(-1, args[0].shape[-1])
            _, weights, indices = out
            for e in range(n):
                tok, pos = torch.where(indices == e)
                if tok.numel():
                    norm = _expert_output(experts, e, x[tok]).norm(dim=-1)
                    stats[i]["count"][e] += tok.numel()
                    stats[i]["reap"][e] += (weights[tok, pos].double() * norm.double()).sum()

        handles.append(router.register_forward_hook(hook))
    try:
        for ids in batches:
            model(ids)
            tokens["n"] += ids.numel()
    finally:
        for h in handles:
            h.remove()
    if not tokens["n"]:
        raise UserError("expert scores need at least one batch of calibration tokens")
    return {i: {"frequency": (s["count"] / tokens["n"]).float(),
                "reap": (s["reap"] / s["count"].clamp(min=1)).float()} for i, s in stats.items()}


__all__ = ["channel_norm_scores", "expert_scores"]
