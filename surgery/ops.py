"""Structural ops on real tensors: pure functions `(module, spec, ...) -> None`, one per kind of removal.

Indices passed here are *current positions* inside the module (the applier maps a plan's original indices to them).
Every op rebuilds the affected Parameters with `index_select`, so the result is contiguous, owns its memory and
keeps `requires_grad`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from surgery.arch.base import ArchSpec
from surgery.linalg import svd64
from surgery.modules import LowRankLinear, Placeholder, SkippedAttention, SkippedMLP
from surgery.selections import Selections, attention_selections, head_rows, mlp_selections


def get_module(root: nn.Module, path: str) -> nn.Module:
    """`root.get_submodule(path)`, with "" meaning root."""
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `path`."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(root, parent_path), name, new)


def _new_param(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.contiguous(), requires_grad=old.requires_grad)


def select_outputs(linear: nn.Module, keep: Sequence[int], conv1d: bool) -> None:
    """Keep only output features `keep` of a Linear (rows) or a GPT-2 Conv1D (columns), bias included."""
    idx = torch.as_tensor(list(keep), dtype=torch.long, device=linear.weight.device)
    dim = 1 if conv1d else 0
    linear.weight = _new_param(linear.weight, linear.weight.index_select(dim, idx))
    if getattr(linear, "bias", None) is not None:
        linear.bias = _new_param(linear.bias, linear.bias.index_select(0, idx))
    if conv1d:
        linear.nf = len(keep)
    else:
        linear.out_features = len(keep)


def select_inputs(linear: nn.Module, keep: Sequence[int], conv1d: bool) -> None:
    """Keep only input features `keep` of a Linear (columns) or a GPT-2 Conv1D (rows); the bias is untouched."""
    idx = torch.as_tensor(list(keep), dtype=torch.long, device=linear.weight.device)
    dim = 0 if conv1d else 1
    linear.weight = _new_param(linear.weight, linear.weight.index_select(dim, idx))
    if conv1d:
        linear.nx = len(keep)
    else:
        linear.in_features = len(keep)


def prune_attention_heads(
    attn: nn.Module,
    spec: ArchSpec,
    keep_q: Sequence[int],
    keep_kv: Sequence[int],
    n_q: int,
    n_kv: int,
    head_dim: int,
) -> None:
    """Keep query heads `keep_q` and KV heads `keep_kv` of one attention module.

    The caller guarantees the GQA rule: every kept KV group keeps the same number of query heads, and a kept
    query head's group is kept. Because kept heads stay in ascending order, query head i of the result belongs to
    KV group i // (len(keep_q) / len(keep_kv)), exactly as `repeat_kv` expects.
    """
    _select(attn, attention_selections(spec, keep_q, keep_kv, n_q, n_kv, head_dim), spec.conv1d)
    set_attention_counts(attn, spec, len(keep_q), len(keep_kv), head_dim)


# {projection name: (kept output features, kept input features)}, None meaning "all of them"
def _select(parent: nn.Module, selections: Selections, conv1d: bool) -> None:
    for name, (outputs, inputs) in selections.items():
        module = get_module(parent, name)
        if outputs is not None:
            select_outputs(module, outputs, conv1d)
        if inputs is not None:
            select_inputs(module, inputs, conv1d)


def set_attention_counts(attn: nn.Module, spec: ArchSpec, n_q: int, n_kv: int, head_dim: int) -> None:
    """Update the count attributes an attention forward reads (trap: `num_key_value_groups` is set at init)."""
    values = {"kv_groups": n_q // n_kv, "kv_heads": n_kv, "heads": n_q, "q_width": n_q * head_dim}
    for meaning, attr in spec.attn_count_attrs.items():
        setattr(attn, attr, values[meaning])
    if spec.per_module_config:
        # Phi-3 slices its fused qkv with self.config.num_attention_heads: give this layer its own copy.
        attn.config = copy.copy(attn.config)
        setattr(attn.config, spec.cfg_heads, n_q)
        if spec.cfg_kv_heads:
            setattr(attn.config, spec.cfg_kv_heads, n_kv)


def prune_mlp_neurons(mlp: nn.Module, spec: ArchSpec, keep: Sequence[int], width: int) -> None:
    """Keep MLP neurons `keep`: rows of gate/up (fc_in), columns of down (fc_out); fused gate_up handled."""
    # fused gate_up rows are [gate: width | up: width]; chunk(2) in the forward splits them again
    _select(mlp, mlp_selections(spec, keep, width), spec.conv1d)


def drop_attention(layer: nn.Module, spec: ArchSpec, layer_idx: int, head_dim: int) -> None:
    """Replace a layer's attention sub-block (and the norms that only serve it) by nothing."""
    setattr(layer, spec.attn, SkippedAttention(layer_idx, head_dim, placeholder=spec.o))
    for norm in spec.attn_norms:
        setattr(layer, norm, nn.Identity())


def drop_mlp(layer: nn.Module, spec: ArchSpec) -> None:
    """Replace a layer's MLP sub-block (and the norms that only serve it) by nothing."""
    setattr(layer, spec.mlp, SkippedMLP(placeholder=spec.down))
    for norm in spec.mlp_norms:
        setattr(layer, norm, nn.Identity())


def _select_linear_side(module: nn.Module, keep: Sequence[int], outputs: bool) -> None:
    """Keep outputs (rows) or inputs (columns) `keep` of a Linear, or of a LowRankLinear's outer factor."""
    if isinstance(module, LowRankLinear):
        _select_linear_side(module.b if outputs else module.a, keep, outputs)
        if outputs:
            module.out_features = len(keep)
        else:
            module.in_features = len(keep)
        return
    (select_outputs if outputs else select_inputs)(module, keep, False)


def prune_hidden_channels(model: nn.Module, spec: ArchSpec, keep: Sequence[int], norm_scale: float = 1.0) -> None:
    """Keep residual-stream channels `keep` everywhere (Llama layout, `spec.hidden_prunable`).

    Embedding columns, the weight of every norm that acts on the residual stream (multiplied by `norm_scale`),
    the input columns of q/k/v/gate/up, the output rows of o/down, lm_head's columns; a tied lm_head is re-tied to
    the sliced embedding instead of being sliced twice. Norms over head_dim (Qwen3's q_norm/k_norm) stay.
    """
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    embed = get_module(model, spec.embed)
    tied = get_module(model, spec.lm_head).weight is embed.weight
    embed.weight = _new_param(embed.weight, embed.weight.index_select(1, idx.to(embed.weight.device)))
    embed.embedding_dim = len(keep)

    def slice_norm(norm: nn.Module) -> None:
        if isinstance(norm, nn.Identity):  # the norm of a dropped sub-block
            return
        w = norm.weight
        norm.weight = _new_param(w, w.index_select(0, idx.to(w.device)) * norm_scale)
        if getattr(norm, "bias", None) is not None:
            norm.bias = _new_param(norm.bias, norm.bias.index_select(0, idx.to(w.device)))

    for layer in get_module(model, spec.layers):
        for name in (*spec.attn_norms, *spec.mlp_norms):
            slice_norm(get_module(layer, name))
        attn, mlp = get_module(layer, spec.attn), get_module(layer, spec.mlp)
        for parent, readers, writer in ((attn, (spec.q, spec.k, spec.v), spec.o), (mlp, (spec.gate, spec.up), spec.down)):
            if isinstance(parent, (SkippedAttention, SkippedMLP)):
                continue
            for name in readers:
                _select_linear_side(get_module(parent, name), keep, outputs=False)
            _select_linear_side(get_module(parent, writer), keep, outputs=True)
    slice_norm(get_module(model, spec.final_norm))
    head = get_module(model, spec.lm_head)
    if tied:
        head.weight = embed.weight
    else:
        _select_linear_side(head, keep, outputs=False)


def prune_moe_experts(mlp: nn.Module, spec: ArchSpec, keep: Sequence[int]) -> None:
    """Keep experts `keep` of an MoE block: slices 0 of the fused expert Parameters and rows of the router.

    Both modules read `num_experts` in their forward (the experts' one_hot, the router's shapes), so it follows.
    """
    experts, router = get_module(mlp, spec.experts), get_module(mlp, spec.router)
    for module in (experts, router):
        for name, param in list(module.named_parameters(recurse=False)):
            idx = torch.as_tensor(list(keep), dtype=torch.long, device=param.device)
            setattr(module, name, _new_param(param, param.index_select(0, idx)))
        module.num_experts = len(keep)


def linear_weight(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """The (out, in) weight of a Linear or of a GPT-2 Conv1D."""
    return module.weight.t() if conv1d else module.weight


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of W (out x in): returns B (out x r), A (r x in) with B @ A the best rank-r approximation.

    sqrt(sigma) goes to each side so both factors have the same scale (friendlier to later fine-tuning); the SVD is
    float64 (`surgery.linalg.svd64`).
    """
    u, s, vh = svd64(weight)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root  # (out, r)
    a = root[:, None] * vh[:rank]  # (r, in)
    return b.to(weight.dtype), a.to(weight.dtype)


def make_low_rank(
    linear: nn.Module, rank: int, conv1d: bool, factors: tuple[torch.Tensor, torch.Tensor] | None = None
) -> LowRankLinear:
    """A LowRankLinear equal to `linear` up to its rank-`rank` truncation (or holding the given (B, A) factors)."""
    weight = linear_weight(linear, conv1d)
    out_features, in_features = weight.shape
    bias = getattr(linear, "bias", None)
    new = LowRankLinear(in_features, out_features, rank, bias is not None, dtype=weight.dtype, device=weight.device)
    b, a = factors if factors is not None else low_rank_factors(weight, rank)
    with torch.no_grad():
        new.a.weight.copy_(a)
        new.b.weight.copy_(b)
        if bias is not None:
            new.b.bias.copy_(bias)
    return new


def low_rank(root: nn.Module, path: str, rank: int, conv1d: bool) -> None:
    """Replace the Linear at `path` by its rank-`rank` factorisation."""
    set_module(root, path, make_low_rank(get_module(root, path), rank, conv1d))


def empty_low_rank(root: nn.Module, path: str, rank: int, conv1d: bool) -> None:
    """Replace the Linear at `path` by an uninitialised LowRankLinear of `rank` (weights come from a checkpoint)."""
    old = get_module(root, path)
    out_features, in_features = linear_weight(old, conv1d).shape
    bias = getattr(old, "bias", None)
    set_module(
        root,
        path,
        LowRankLinear(in_features, out_features, rank, bias is not None, old.weight.dtype, old.weight.device),
    )


# The registry the applier sequences, keyed by plan op name.
OPS: dict[str, Callable[..., None]] = {
    "prune_heads": prune_attention_heads,
    "prune_kv_groups": prune_attention_heads,
    "prune_neurons": prune_mlp_neurons,
    "drop_attention": drop_attention,
    "drop_mlp": drop_mlp,
    "low_rank": low_rank,
}

__all__ = [
    "OPS",
    "Placeholder",
    "Selections",
    "attention_selections",
    "drop_attention",
    "drop_mlp",
    "get_module",
    "head_rows",
    "low_rank",
    "low_rank_factors",
    "make_low_rank",
    "mlp_selections",
    "prune_attention_heads",
    "prune_hidden_channels",
    "prune_moe_experts",
    "prune_mlp_neurons",
    "select_inputs",
    "select_outputs",
    "set_module",
]
