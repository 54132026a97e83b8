"""Parameters and FLOPs per token before and after a plan, without reading weights.

The plan is applied to a copy of the model built on the meta device (no memory, ~20 ms for a 135M model), so the
counts are exact for every family and every op, and agree with `surgery.inspect` on written checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from surgery.apply import apply_resolution
from surgery.resolve import Resolution
from surgery.shapes import LayerShape


@dataclass(frozen=True)
class Estimate:
    """Sizes before and after a plan; FLOPs are forward FLOPs for one token at `context` tokens of context."""

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    context: int
    layer_params_after: tuple[int, ...] = ()  # per ORIGINAL layer (0 when dropped): the TUI's params column

    @property
    def removed_fraction(self) -> float:
        return 1 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def speedup(self) -> float:
        """The ideal speed-up the FLOP reduction predicts."""
        return self.flops_before / self.flops_after if self.flops_after else float("inf")


def meta_model(config_dict: dict) -> nn.Module:
    """The model class of `config_dict` on the meta device, reshaped to its `surgery_layers` when present."""
    from surgery.concurrency import MODEL_BUILD_LOCK

    with MODEL_BUILD_LOCK:  # also guards the first import: transformers' lazy modules are not import-thread-safe
        from transformers import AutoConfig, AutoModelForCausalLM

        from surgery.export import restructure_to_config

        config = AutoConfig.for_model(**config_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    if config_dict.get("surgery_layers"):
        restructure_to_config(model, config_dict)
    return model


def count_params(model: nn.Module) -> int:
    """Parameters, a tied embedding counted once (parameters() yields shared tensors once)."""
    return sum(p.numel() for p in model.parameters())


def linear_flops(model: nn.Module) -> int:
    """2 x multiply-accumulates per token of every Linear (GPT-2 Conv1D included; the embedding lookup is free)."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features
        elif type(module).__name__ == "Conv1D":
            total += 2 * module.weight.numel()
    return total


def attention_flops(config_dict: dict, layers: list[tuple[int, LayerShape]], context: int) -> int:
    """Scores and weighted sum, 2 * 2 * heads * head_dim * span per layer; `layers` pairs each layer with its
    ORIGINAL index, which decides its span (sliding-window layers attend to at most the window)."""
    from surgery.inspect import attention_span

    n = len(config_dict.get("layer_types") or []) or None
    return sum(4 * s.heads * s.head_dim * attention_span(config_dict, i, n or -1, context) for i, s in layers)


def estimate(config_dict: dict, resolution: Resolution, context: int = 2048) -> Estimate:
    """Exact parameters and FLOPs/token before and after `resolution` (see the module docstring)."""
    model = meta_model(config_dict)
    params_before = count_params(model)
    flops_before = linear_flops(model) + attention_flops(config_dict, list(enumerate(resolution.shape.layers)), context)
    layers = list(model.get_submodule(resolution.shape.spec.layers))  # the same objects survive the cuts
    apply_resolution(model, resolution, factorize=False)
    kept = [(c.index, c.result_shape()) for c in resolution.kept_layers]
    flops_after = linear_flops(model) + attention_flops(config_dict, kept, context)
    per_layer = tuple(0 if c.dropped else count_params(layer) for c, layer in zip(resolution.layers, layers))
    return Estimate(params_before, count_params(model), flops_before, flops_after, context, per_layer)
