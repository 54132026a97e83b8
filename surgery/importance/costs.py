"""Parameter costs per component for `surgery.suggest`: what one query head, one KV group (its k/v heads), one
neuron and one whole layer own, per layer, measured on a meta-device model (`surgery.estimate.meta_model`)."""

from __future__ import annotations

from dataclasses import dataclass

from surgery.importance.layout import LayerSite, ModelLayout


@dataclass
class Costs:
    """Parameters owned by one query head, one KV group (its k/v heads), one neuron, one layer; per layer."""

    head: list[int]
    kv: list[int]
    neuron: list[int]
    layer: list[int]
    total: int


def _numel(module, names=("weight", "bias")) -> int:
    return sum(getattr(module, n).numel() for n in names if getattr(module, n, None) is not None)


def _layer_costs(site: LayerSite, spec) -> tuple[int, int, int]:
    head = kv = neuron = 0
    if site.o_proj is not None and site.heads:
        attn = site.module.get_submodule(spec.attn)
        h, n_kv = site.heads, site.kv_heads
        if spec.qkv:  # rows [q heads | k heads | v heads], every head the same number of rows
            per = _numel(attn.get_submodule(spec.qkv)) // (h + 2 * n_kv)
            head, kv = per, 2 * per
        else:
            head = _numel(attn.get_submodule(spec.q)) // h
            kv = (_numel(attn.get_submodule(spec.k)) + _numel(attn.get_submodule(spec.v))) // n_kv
        head += _numel(site.o_proj, ("weight",)) // h  # o_proj columns; its bias is not per head
    if site.down is not None and site.width:
        mlp = site.module.get_submodule(spec.mlp)
        names = (spec.gate_up,) if spec.gate_up else tuple(n for n in (spec.gate, spec.up) if n)
        neuron = sum(_numel(mlp.get_submodule(n)) for n in names) // site.width
        neuron += _numel(site.down, ("weight",)) // site.width
    return head, kv, neuron


def layer_costs(layout: ModelLayout, total: int) -> Costs:
    per = [_layer_costs(s, layout.spec) for s in layout.layers]
    layer = [sum(p.numel() for p in s.module.parameters()) for s in layout.layers]
    return Costs([p[0] for p in per], [p[1] for p in per], [p[2] for p in per], layer, total)
