"""Sequence the structural ops of a validated plan on a live model, and rewrite its config to match.

Order inside one layer is fixed (heads, neurons, sub-block drops, then low rank) so that the result does not
depend on the order of steps in the plan; whole layers are dropped last and the survivors renumbered.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from surgery import ops
from surgery.plan import DATA_RANK_METHODS, Plan
from surgery.resolve import LayerCut, Resolution, resolve_plan
from surgery.shapes import SURGERY_LAYERS_KEY, LayerShape, shape_from_config

Progress = Callable[[int, int, str], None]


def model_shape(model: nn.Module):
    """The ModelShape of a live model, from its config (which `apply_resolution` keeps truthful)."""
    return shape_from_config(model.config.to_dict())


def validate_plan(plan: Plan, model_or_config) -> Resolution:
    """Check a plan against a model (or a config.json dict) without touching any tensor."""
    cfg = model_or_config if isinstance(model_or_config, dict) else model_or_config.config.to_dict()
    return resolve_plan(plan, shape_from_config(cfg))


def apply_layer_cut(layer: nn.Module, cut: LayerCut, spec, position: int, factorize: bool = True) -> None:
    """Apply one layer's cuts in place. `position` is the layer's index in the model being edited.

    `factorize=False` puts uninitialised low-rank modules in place instead of running the SVD (for meta-device
    previews that only need shapes).
    """
    s = cut.shape
    if s.has_attention:
        if cut.drop_attention:
            ops.drop_attention(layer, spec, position, s.head_dim)
        elif cut.heads:
            attn = ops.get_module(layer, spec.attn)
            ops.prune_attention_heads(attn, spec, cut.kept_heads, cut.kept_groups, s.heads, s.kv_heads, s.head_dim)
    if s.has_mlp:
        if cut.drop_mlp:
            ops.drop_mlp(layer, spec)
        elif cut.neurons:
            ops.prune_mlp_neurons(ops.get_module(layer, spec.mlp), spec, cut.kept_neurons, s.mlp)
        elif cut.experts:
            ops.prune_moe_experts(ops.get_module(layer, spec.mlp), spec, cut.kept_experts)
    for rel, rank in sorted(cut.low_rank.items()):
        if factorize and cut.low_rank_method.get(rel) in DATA_RANK_METHODS:
            continue  # factorised from calibration activations, layer by layer (surgery.reconstruct)
        if cut._module_kept(rel):
            (ops.low_rank if factorize else ops.empty_low_rank)(layer, rel, rank, spec.conv1d)


@torch.no_grad()
def apply_resolution(
    model: nn.Module, resolution: Resolution, progress: Progress | None = None, factorize: bool = True
) -> nn.Module:
    """Apply a Resolution to `model` in place and return it. The model must be the one it was resolved against."""
    spec = resolution.shape.spec
    if resolution.hidden_removed:
        # First, on the dense layers: a low_rank step then factorises the sliced weight, not a slice of factors.
        hidden = resolution.shape.hidden
        scale = (hidden / resolution.result_hidden) ** 0.5 if resolution.rescale_norms else 1.0
        ops.prune_hidden_channels(model, spec, resolution.kept_channels, scale)
        setattr(model.config, spec.cfg_hidden, resolution.result_hidden)
    layers = ops.get_module(model, spec.layers)
    total = len(resolution.layers)
    for cut in resolution.layers:
        if not cut.dropped and cut.changed:
            apply_layer_cut(layers[cut.index], cut, spec, cut.index, factorize)
        if progress:
            progress(cut.index + 1, total, "layers")
    kept = [cut.index for cut in resolution.kept_layers]
    if len(kept) != len(layers):
        ops.set_module(model, spec.layers, nn.ModuleList([layers[i] for i in kept]))
        for new_idx, layer in enumerate(ops.get_module(model, spec.layers)):
            # The KV cache is indexed by layer_idx: survivors must be numbered 0..n-1.
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
    experts = resolution.result_experts
    expert_counts = {n for n in experts if n}
    if len(expert_counts) == 1:  # per-layer counts keep the base count here and go to surgery_layers
        setattr(model.config, spec.cfg_experts, expert_counts.pop())
    if factorize:  # a shapes-only preview does not need a truthful config (and plain_builds_same costs a build)
        rewrite_config(model, resolution.shape, resolution.result_shapes(), kept, experts)
    return model


def apply_plan(
    model: nn.Module, plan: Plan, progress: Progress | None = None, tokenizer=None
) -> tuple[nn.Module, Resolution]:
    """Validate `plan` against `model`, then apply it in place.

    A plan with data-driven steps (reconstruct, whitened low_rank) needs `tokenizer` to read its calibration text.
    """
    resolution = validate_plan(plan, model)
    if resolution.needs_data:
        from surgery.reconstruct import apply_calibrated

        apply_calibrated(model, resolution, tokenizer)
        return model, resolution
    return apply_resolution(model, resolution, progress), resolution


def rewrite_config(model: nn.Module, shape, result: list[LayerShape], kept: list[int],
                   experts: list[int] | None = None) -> None:
    """Make `model.config` describe the pruned model.

    Uniform results get plain values (num_attention_heads, num_key_value_heads, intermediate_size, head_dim) when
    plain transformers, built from that config, gives exactly the model's tensor shapes. Anything else keeps the
    base model's global values and lists every layer in `surgery_layers` (docs/formats.md); such checkpoints load
    with `surgery.load`. `experts` (MoE models): experts each kept layer keeps (0: dense MLP); more than one count
    among the MoE layers cannot be said in a plain config, so the entries then carry `experts` too.
    """
    config, spec = model.config, shape.spec
    setattr(config, spec.cfg_layers, len(result))
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) == len(shape.layers):
        config.layer_types = [layer_types[i] for i in kept]
    if hasattr(config, SURGERY_LAYERS_KEY):
        delattr(config, SURGERY_LAYERS_KEY)
    uniform = len({(s.heads, s.kv_heads, s.mlp) for s in result}) == 1 and not any(
        s.low_rank or not s.has_attention or not s.has_mlp for s in result
    ) and len({n for n in experts or [] if n}) <= 1
    if uniform and result:
        set_uniform_sizes(config, spec, result[0])
        if plain_builds_same(model):
            return
    set_uniform_sizes(config, spec, None, shape)
    entries = [s.to_entry() for s in result]
    for entry, n in zip(entries, experts or []):
        entry["experts"] = n
    setattr(config, SURGERY_LAYERS_KEY, entries)


def plain_builds_same(model: nn.Module) -> bool:
    """True when plain transformers, from `model.config` alone, builds exactly `model`'s tensor names and shapes.

    Why not just trust the numbers: configs validate (LlamaConfig refuses 7 heads for hidden 576), some families
    derive head_dim from hidden / heads (GPT-2), and a silent mismatch would load garbage. Built on the meta device,
    so it costs no memory even for a 70B model.
    """
    from transformers import AutoModelForCausalLM

    from surgery.concurrency import MODEL_BUILD_LOCK

    try:
        cfg = type(model.config).from_dict(model.config.to_dict())
        with MODEL_BUILD_LOCK, torch.device("meta"):
            ref = AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001 - any refusal means "not plain"
        return False
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    return ours == theirs


def set_uniform_sizes(config, spec, layer: LayerShape | None, base=None) -> None:
    """Write global head/KV/MLP sizes: those of `layer`, or the base model's when `layer` is None."""
    heads = layer.heads if layer else base.base_heads
    kv = layer.kv_heads if layer else base.base_kv_heads
    mlp = layer.mlp if layer else base.base_mlp
    head_dim = layer.head_dim if layer else base.layers[0].head_dim if base.layers else None
    setattr(config, spec.cfg_heads, heads)
    if spec.cfg_kv_heads:
        setattr(config, spec.cfg_kv_heads, kv)
    setattr(config, spec.cfg_mlp, mlp)
    if spec.family != "gpt2" and head_dim:
        # Llama-style configs derive head_dim = hidden / heads unless it is explicit; keep the real one.
        config.head_dim = head_dim


__all__ = ["apply_plan", "apply_resolution", "model_shape", "plain_builds_same", "rewrite_config", "validate_plan"]
