"""Where the scored parts of a live model are: one `LayerSite` per decoder layer, from the family's ArchSpec.

Scoring reads the two places every family shares, whatever its projection layout:
- the input of the attention output projection (`o_proj`; GPT-2's `attn.c_proj`, a Conv1D): the concatenated
  query-head outputs, head h at features [h * head_dim, (h + 1) * head_dim);
- the input of the MLP down projection (`down_proj`; GPT-2's `mlp.c_proj`): one feature per neuron, which is the
  width index for fused gate_up layouts too (Phi-3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from surgery.arch import ArchSpec, spec_for_config
from surgery.ops import get_module
from surgery.shapes import ModelShape, shape_from_config


@dataclass
class LayerSite:
    """One decoder layer of a live model, as scoring sees it."""

    index: int
    path: str  # "model.layers.3"
    module: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    width: int
    attn_path: str | None = None  # "model.layers.3.self_attn" (None when the block is gone)
    o_proj: nn.Module | None = None
    mlp_path: str | None = None
    down: nn.Module | None = None
    linears: dict[str, nn.Module] = field(default_factory=dict)  # full path -> Linear / Conv1D with a 2-D weight

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads if self.kv_heads else 0


@dataclass
class ModelLayout:
    """Every scored site of a model, plus where model-level (per-layer) metrics are stored."""

    spec: ArchSpec
    shape: ModelShape
    layers: list[LayerSite]
    model_path: str  # "model" (Llama) / "transformer" (GPT-2): the module holding the decoder layers
    embed: nn.Module

    @property
    def conv1d(self) -> bool:
        return self.spec.conv1d


def _dense(module: nn.Module) -> bool:
    """A Linear or Conv1D with a real 2-D weight (low-rank pairs and placeholders are not scored)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.numel() > 0


def model_layout(model: nn.Module) -> ModelLayout:
    """Find the scored sites of `model` (any supported family, pruned checkpoints included).

    Raises:
        UnsupportedModelError: the model's family has no ArchSpec.
    """
    spec = spec_for_config(model.config)
    shape = shape_from_config(model.config.to_dict())
    layers_module = get_module(model, spec.layers)
    sites = []
    for i, (layer, s) in enumerate(zip(layers_module, shape.layers)):
        path = spec.layer_prefix(i)
        site = LayerSite(i, path, layer, s.heads, s.kv_heads, s.head_dim, s.mlp)
        if s.has_attention:
            site.attn_path = f"{path}.{spec.attn}"
            attn = get_module(layer, spec.attn)
            site.o_proj = get_module(attn, spec.o)
            for name in spec.attn_linears:
                mod = get_module(attn, name)
                if _dense(mod):
                    site.linears[f"{site.attn_path}.{name}"] = mod
        if s.has_mlp:
            site.mlp_path = f"{path}.{spec.mlp}"
            mlp = get_module(layer, spec.mlp)
            site.down = get_module(mlp, spec.down)
            for name in spec.mlp_linears:
                mod = get_module(mlp, name)
                if _dense(mod):
                    site.linears[f"{site.mlp_path}.{name}"] = mod
        sites.append(site)
    model_path = spec.layers.rpartition(".")[0] or "model"
    return ModelLayout(spec, shape, sites, model_path, model.get_input_embeddings())


def weight_out_in(module: nn.Module, conv1d: bool):
    """The (out, in) weight of a Linear, or of a GPT-2 Conv1D (stored (in, out))."""
    return module.weight.t() if conv1d else module.weight
