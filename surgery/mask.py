"""Simulate a plan on the unmodified model with hooks: the oracle for every structural op, and a cheap preview.

Masking semantics (what "removed" means, independent of how ops.py implements it):
- a query head: its slice of the o_proj input is zeroed;
- an MLP neuron: its slice of the down_proj input is zeroed;
- an attention / MLP sub-block: its output is replaced by zeros (identity on the residual stream);
- a whole layer: its output is its input (identity);
- low rank: the Linear's weight is replaced by its best rank-r approximation (dense).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from surgery.linalg import svd64
from surgery.ops import get_module, linear_weight
from surgery.resolve import Resolution


def _zero_inputs(removed: list[int], width: int):
    """Forward pre-hook that zeroes features `removed` (in units of `width`) of the module's input."""

    def hook(module, args):
        x = args[0].clone()
        for unit in removed:
            x[..., unit * width : (unit + 1) * width] = 0
        return (x, *args[1:])

    return hook


def _zero_output(module, args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def _identity_layer(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def _dense_low_rank(weight: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = svd64(weight)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(weight.dtype)  # (out, in)


@contextlib.contextmanager
def masked(model: nn.Module, resolution: Resolution) -> Iterator[nn.Module]:
    """Within the block, `model` behaves as if `resolution` were applied; tensors are restored afterwards."""
    spec = resolution.shape.spec
    layers = get_module(model, spec.layers)
    handles = []
    restore: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        for cut in resolution.layers:
            layer = layers[cut.index]
            if cut.dropped:
                handles.append(layer.register_forward_hook(_identity_layer, with_kwargs=True))
                continue
            if cut.drop_attention:
                handles.append(get_module(layer, spec.attn).register_forward_hook(_zero_output))
            elif cut.heads:
                o_proj = get_module(layer, f"{spec.attn}.{spec.o}")
                hook = _zero_inputs(sorted(cut.heads), cut.shape.head_dim)
                handles.append(o_proj.register_forward_pre_hook(hook))
            if cut.drop_mlp:
                handles.append(get_module(layer, spec.mlp).register_forward_hook(_zero_output))
            elif cut.neurons:
                down = get_module(layer, f"{spec.mlp}.{spec.down}")
                handles.append(down.register_forward_pre_hook(_zero_inputs(sorted(cut.neurons), 1)))
            for rel, rank in cut.low_rank.items():
                if not cut._module_kept(rel):
                    continue
                linear = get_module(layer, rel)
                restore.append((linear, linear.weight.data))
                # low rank acts on the pruned matrix: mask removed rows/columns first, then truncate
                w = linear_weight(linear, spec.conv1d).detach().clone()
                w = _apply_structural_zeros(w, cut, rel, spec)
                approx = _dense_low_rank(w, rank)
                linear.weight.data = approx.t().contiguous() if spec.conv1d else approx
        yield model
    finally:
        for h in handles:
            h.remove()
        for linear, data in restore:
            linear.weight.data = data


def _apply_structural_zeros(w: torch.Tensor, cut, rel: str, spec) -> torch.Tensor:
    """Zero the rows/columns of an (out, in) weight that the layer's head or neuron cuts remove.

    The SVD of a matrix with zeroed rows/columns equals the SVD of the matrix without them, so the dense
    approximation here matches low rank applied after structural pruning.
    """
    block, name = rel.split(".", 1)
    hd, n_q, n_kv = cut.shape.head_dim, cut.shape.heads, cut.shape.kv_heads
    removed_q = [r for h in sorted(cut.heads) for r in range(h * hd, (h + 1) * hd)]
    removed_groups = [g for g in range(n_kv) if g not in cut.kept_groups] if cut.heads else []
    removed_kv = [r for g in removed_groups for r in range(g * hd, (g + 1) * hd)]
    neurons = sorted(cut.neurons)
    if block == spec.attn:
        rows = {
            spec.q: removed_q,
            spec.k: removed_kv,
            spec.v: removed_kv,
            spec.qkv: removed_q + [n_q * hd + r for r in removed_kv] + [(n_q + n_kv) * hd + r for r in removed_kv],
        }.get(name, [])
        cols = removed_q if name == spec.o else []
    else:
        width = cut.shape.mlp
        rows = {spec.gate: neurons, spec.up: neurons, spec.gate_up: neurons + [width + i for i in neurons]}.get(
            name, []
        )
        cols = neurons if name == spec.down else []
    if rows:
        w[rows, :] = 0
    if cols:
        w[:, cols] = 0
    return w
