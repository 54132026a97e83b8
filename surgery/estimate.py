"""Parameters and FLOPs per token before and after a plan, without reading weights.

The plan is applied to a copy of the model built on the meta device (no memory, ~20 ms for a 135M model), so the
counts are exact for every family and every op, and agree with `surgery.inspect` on written checkpoints. Given the
checkpoint's directory, the dense families are counted from its safetensors headers instead (the output tensors
`surgery.stream.layout` derives, no torch: a 70B in tens of MB), with the same exact results (tests/test_stream_dry.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.resolve import Resolution
from surgery.shapes import LayerShape

if TYPE_CHECKING:
    from torch import nn


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
    import torch

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
    from torch import nn

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


def estimate(config_dict: dict, resolution: Resolution, context: int = 2048,
             source_dir: Path | str | None = None) -> Estimate:
    """Exact parameters and FLOPs/token before and after `resolution` (see the module docstring).

    Args:
        config_dict: the model's config.json.
        resolution: the plan resolved against it.
        context: tokens of context for the attention term of the FLOPs.
        source_dir: the checkpoint's directory, when there is one: its headers are counted without torch where
            `surgery.stream.layout` covers them; otherwise (and without it) a meta-device model is.
    """
    if source_dir is not None and Path(source_dir).is_dir():  # a .gguf file has no safetensors headers
        from surgery.errors import SourceError
        from surgery.stream.layout import NotCovered

        try:
            return header_estimate(Path(source_dir), config_dict, resolution, context)
        except (NotCovered, SourceError):  # e.g. MoE, surgery_layers, no safetensors: the meta-device model counts
            pass
    from surgery.apply import apply_resolution

    model = meta_model(config_dict)
    params_before = count_params(model)
    flops_before = linear_flops(model) + attention_flops(config_dict, list(enumerate(resolution.shape.layers)), context)
    layers = list(model.get_submodule(resolution.shape.spec.layers))  # the same objects survive the cuts
    apply_resolution(model, resolution, factorize=False)
    kept = [(c.index, c.result_shape()) for c in resolution.kept_layers]
    flops_after = linear_flops(model) + attention_flops(config_dict, kept, context)
    per_layer = tuple(0 if c.dropped else count_params(layer) for c, layer in zip(resolution.layers, layers))
    return Estimate(params_before, count_params(model), flops_before, flops_after, context, per_layer)


def header_estimate(source_dir: Path, config_dict: dict, resolution: Resolution, context: int = 2048) -> Estimate:
    """`estimate` from the checkpoint's safetensors headers and `surgery.stream.layout` (no torch, no model).

    The meta-device model's Linears are exactly the 2-D `.weight` tensors it saves other than the embeddings, plus
    the lm_head when it is tied (a Linear whose weight is not saved again), so the same sums come out.

    Raises:
        NotCovered: The header-only derivation does not cover this family, checkpoint or plan.
        SourceError: The directory has no readable safetensors.
    """
    from surgery.stream.layout import embedding_names, output_state, params_of
    from surgery.stream.source import tensor_locations

    shape, spec = resolution.shape, resolution.shape.spec
    sources = tensor_locations(source_dir)
    before = {name: src.shape for name, src in sources.items()}
    after = {name: tensor_shape for name, (_, tensor_shape) in output_state(config_dict, resolution, sources).items()}
    skip = embedding_names(spec)
    tied_head = shape.vocab * shape.hidden if config_dict.get("tie_word_embeddings") else 0

    def linear_flops_of(state: dict[str, tuple[int, ...]]) -> int:
        weights = sum(math.prod(s) for n, s in state.items() if len(s) == 2 and n.endswith(".weight") and n not in skip)
        return 2 * (weights + tied_head)

    flops_before = linear_flops_of(before) + attention_flops(config_dict, list(enumerate(shape.layers)), context)
    kept = [(c.index, c.result_shape()) for c in resolution.kept_layers]
    flops_after = linear_flops_of(after) + attention_flops(config_dict, kept, context)
    per_position: dict[int, int] = {}
    prefix = spec.layers + "."
    for name, tensor_shape in after.items():
        if name.startswith(prefix):
            position = int(name[len(prefix):].partition(".")[0])
            per_position[position] = per_position.get(position, 0) + math.prod(tensor_shape)
    originals = {c.index: p for p, c in enumerate(resolution.kept_layers)}
    per_layer = tuple(per_position.get(originals[c.index], 0) if c.index in originals else 0
                      for c in resolution.layers)
    return Estimate(params_of(sources), sum(math.prod(s) for s in after.values()),
                    flops_before, flops_after, context, per_layer)
