"""Where the scored parts of a live model are: one `LayerSite` per decoder layer, from the family's ArchSpec.

Scoring reads the two places every family shares, whatever its projection layout:
- the input of the attention output projection (`o_proj`; GPT-2's `attn.c_proj`, a Conv1D): the concatenated
  query-head outputs, head h at features [h * head_dim, (h + 1) * head_dim);
- the input of the MLP down projection (`down_proj`; GPT-2's `mlp.c_proj`): one feature per neuron, which is the
  width index for fused gate_up layouts too (Phi-3).

A mixture-of-experts layer (Qwen3-MoE, Mixtral) has no down projection: its site holds the fused experts module
and the router instead (`experts`, `router`, `num_experts`), and `width` is 0 (no neurons are scored there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from surgery.arch import ArchSpec, spec_for_config
from surgery.modules import LowRankLinear, dense_weight
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
    experts: nn.Module | None = None  # MoE layers: the fused experts module (gate_up_proj, down_proj per expert)
    router: nn.Module | None = None
    num_experts: int = 0

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
    # every norm over the residual width: each layer's attention and MLP norms, then the final norm
    hidden_norms: list[nn.Module] = field(default_factory=list)

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
            if spec.cfg_experts and hasattr(mlp, spec.router) and not hasattr(mlp, spec.down):
                site.experts, site.router = get_module(mlp, spec.experts), get_module(mlp, spec.router)
                site.num_experts, site.width = int(site.experts.num_experts), 0
            else:
                site.down = get_module(mlp, spec.down)
                for name in spec.mlp_linears:
                    mod = get_module(mlp, name)
                    if _dense(mod):
                        site.linears[f"{site.mlp_path}.{name}"] = mod
        sites.append(site)
    model_path = spec.layers.rpartition(".")[0] or "model"
    norms = [get_module(layer, name) for layer in layers_module for name in (*spec.attn_norms, *spec.mlp_norms)]
    norms = [n for n in (*norms, get_module(model, spec.final_norm)) if not isinstance(n, nn.Identity)]
    return ModelLayout(spec, shape, sites, model_path, model.get_input_embeddings(), norms)


def weight_out_in(module: nn.Module, conv1d: bool):
    """The (out, in) weight of a Linear, of a GPT-2 Conv1D (stored (in, out)), or of a low-rank Linear of a
    surgery checkpoint multiplied back (B @ A: its `weight` is a zero-length placeholder)."""
    if isinstance(module, LowRankLinear):
        return dense_weight(module)[0]
    return module.weight.t() if conv1d else module.weight
