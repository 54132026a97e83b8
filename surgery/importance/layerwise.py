"""Layer-by-layer scoring: the forward-only scores of a checkpoint holding one decoder block in memory at a time.

`score_model` needs the whole model on its devices; a 70B model does not fit one GPU. The forward-only metrics
(activation norms, input sums of squares, block influence) of block l depend only on block l's weights and its
input hidden states, so they can be computed block after block:

1. the model is built on the meta device (parameters only: buffers such as the rotary frequencies are real and
   computed as from_pretrained computes them), the embeddings are read from the safetensors shards;
2. one forward of the model's own top part per batch, with every decoder layer swapped for a catcher, gives the
   first block's input and the exact (args, kwargs) the model passes each layer (attention masks, position ids,
   rotary cos/sin, per-layer-type masks): no family-specific forward code, so nothing can drift from the real
   forward. The last catcher stops the forward, so the final norm and lm_head never run (nor load);
3. per block: its tensors are read from the shards (`safe_open(...).get_tensor`), every batch's hidden states go
   through it under the same hooks as `score_model` (`CombinedHooks`), the weight-based scores of the block
   (sv, sv-act, neuron-wanda, magnitudes) are computed while it is loaded, then it goes back to the meta device;
   the hidden states of all calibration tokens stay on the device between blocks.

Peak memory: the embeddings + one block + the hidden states of all calibration tokens (tokens x hidden x dtype)
+ one batch's activations. Gradient and ablation methods need the whole model (a loss at the end) and are refused.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from surgery import ops
from surgery.errors import SourceError, UserError
from surgery.importance.hooks import CombinedHooks
from surgery.importance.layout import LayerSite, ModelLayout, model_layout
from surgery.importance.methods import METHODS, Method, parse_methods
from surgery.importance.runner import PhaseStart, TokenProgress, autocast_context, check_cancel
from surgery.importance.weights import linear_scores, magnitude_scores, neuron_wanda
from surgery.sources import ResolvedSource

# metrics whose value for block l needs only block l (its weights and its input hidden states); channel_norm
# also reads the final norm's output, which runs once after the last block
LAYERWISE_METRICS = frozenset({"head_act", "neuron_act", "neuron_wanda", "layer_bi", "sv_act", "channel_norm",
                               "expert_freq", "expert_reap", "sv", "head_magnitude", "neuron_magnitude"})


def layerwise_method_names() -> list[str]:
    """The registry's method names `--layerwise` computes, in registry order."""
    return [name for name, m in METHODS.items() if m.metric in LAYERWISE_METRICS]


def check_layerwise_methods(methods: Sequence[Method]) -> None:
    """Refuse methods that need gradients or ablation (a loss over the whole model) in one line."""
    bad = [m.name for m in methods if m.metric not in LAYERWISE_METRICS]
    if bad:
        raise UserError(
            f"--layerwise runs forward passes one block at a time, so {', '.join(bad)} (gradients or ablation of "
            f"the whole model) cannot run with it; layer by layer works for: {', '.join(layerwise_method_names())}"
        )


def layerwise_methods(spec: str | Sequence[str], arch=None) -> list[Method]:
    """Parse `--method` for `--layerwise`: an alias (fast, all) brings the methods it holds that run layer by
    layer (and, given the model's ArchSpec `arch`, that apply to it); a method named explicitly that cannot is
    refused (see `check_layerwise_methods` and `parse_methods`)."""
    chosen = parse_methods(spec, arch=arch)  # unknown names fail here, aliases expand
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    explicit = {n.strip().lower().replace("_", "-") for n in names} & METHODS.keys()
    check_layerwise_methods([m for n, m in METHODS.items() if n in explicit])
    kept = [m for m in chosen if m.metric in LAYERWISE_METRICS]
    if not kept:  # an alias with nothing layer by layer in it (ablate): say why
        check_layerwise_methods(chosen)
    return kept


class _Stop(Exception):
    """Raised by the last catcher: everything after the decoder layers (final norm, lm_head) is skipped."""


class _Catcher(nn.Module):
    """Stands in for decoder layer `index` during one forward of the model's top part; records its arguments."""

    def __init__(self, index: int, calls: list, first: list, last: bool) -> None:
        super().__init__()
        self.index, self.calls, self.first, self.last = index, calls, first, last

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.first.append(hidden_states)
        self.calls.append((args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


def capture_layer_calls(model: nn.Module, layers_path: str, batches: Sequence[torch.Tensor],
                        autocast=contextlib.nullcontext) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """Run the model's top part on each batch of token ids with its decoder layers swapped for catchers.

    Returns:
        (the first layer's input per batch, per layer per batch the (args, kwargs) the model passes it). Masks and
        rotary tensors are shared by the layers (the model computes them once per forward), not copied per layer.
    """
    layers = ops.get_module(model, layers_path)
    n = len(layers)
    calls: list[list[tuple]] = [[] for _ in range(n)]
    first: list[torch.Tensor] = []
    catchers = nn.ModuleList([_Catcher(i, calls[i], first, i == n - 1) for i in range(n)])
    ops.set_module(model, layers_path, catchers)
    try:
        for ids in batches:
            with autocast(), contextlib.suppress(_Stop):
                model(input_ids=ids, use_cache=False)
    finally:
        ops.set_module(model, layers_path, layers)
    return first, calls


def call_layer(layer: nn.Module, x: torch.Tensor, call: tuple) -> torch.Tensor:
    """The layer's output hidden states for input `x` and the (args, kwargs) the model passes it."""
    args, kwargs = call
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class CheckpointReader:
    """Reads a HF directory's tensors by name from its safetensors shards, a few at a time.

    Each read opens the shards it needs and closes them again: safe_open maps the whole file, and pages read
    through a mapping that stays open would count towards the process's memory until the end of the run.
    """

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        from surgery.stream.source import weight_shards

        self.directory = directory
        self.where: dict[str, Path] = {}
        for path in weight_shards(directory):
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    self.where[name] = path

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """{name: tensor} as stored (CPU, the checkpoint's dtype)."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.where]
        if missing:
            raise SourceError(f"{self.directory} has no tensor {missing[0]!r} (and {len(missing) - 1} more missing): "
                              "its names differ from what the model class expects, so it cannot be read layer by "
                              "layer; score it without --layerwise")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for path, group in by_file.items():
            with safe_open(str(path), "pt") as f:
                for n in group:
                    out[n] = f.get_tensor(n)
        return out


def skeleton_model(path: Path, config_dict: dict, dtype: torch.dtype) -> nn.Module:
    """The model `surgery.loading.load_model` would build from `path`: parameters on the meta device, buffers
    real on CPU (computed at construction, the values from_pretrained's initialisation gives them)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgery.concurrency import MODEL_BUILD_LOCK
    from surgery.export import restructure_to_config

    surgery_ckpt = bool(config_dict.get("surgery_layers"))
    with MODEL_BUILD_LOCK:
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, **({} if surgery_ckpt else {"dtype": dtype}))
    if surgery_ckpt:  # as load_surgery_checkpoint: reshape the layers, then cast everything (buffers too)
        restructure_to_config(model, config_dict)
        model = model.to(dtype)
    # accelerate's init_empty_weights re-creates every parameter assigned while it is active, so a tied lm_head
    # came out as a parameter of its own: tie it again, as loading ties it
    model.tie_weights()
    return model.eval()


def _fill(module: nn.Module, prefix: str, reader: CheckpointReader, device: torch.device, shape) -> None:
    """Give `module`'s parameters and persistent buffers (named `prefix` + their name in the checkpoint) their
    stored values on `device`, each cast to the dtype the model gave it (as loading the whole model casts)."""
    from surgery.export.hf import fuse_expert_tensors

    # everything stored under the prefix: MoE checkpoints hold experts one by one, fused in the model (as
    # from_pretrained and the surgery loader fuse them), and tensors the model does not expect are ignored
    loaded = reader.read([n for n in reader.where if n.startswith(prefix)])
    if shape.experts:
        loaded = fuse_expert_tensors(loaded, shape)
    values = {}
    for rel, meta in module.state_dict().items():
        stored = loaded.get(prefix + rel)
        if stored is None:
            raise SourceError(f"{reader.directory} has no tensor {prefix + rel!r}: its names differ from what the "
                              "model class expects, so it cannot be read layer by layer; score it without --layerwise")
        values[rel] = stored.to(device=device, dtype=meta.dtype)
    module.load_state_dict(values, strict=True, assign=True)


def _top_part(model: nn.Module, layout: ModelLayout) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module with parameters of its own that the top part runs: all but the decoder
    layers, the final norm and lm_head (never run: the last catcher stops the forward before them)."""
    spec = layout.spec
    skip = {spec.layers, spec.final_norm}
    head = model.get_output_embeddings()
    out = []
    for name, module in model.named_modules():
        if not name or module is head or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if next(module.parameters(recurse=False), None) is not None:
            out.append((name, module))
    return out


class Skeleton:
    """A checkpoint's model on the meta device with real buffers, filled block by block from its shards."""

    def __init__(self, path: Path, config_dict: dict, dtype: torch.dtype, device: torch.device) -> None:
        from surgery.shapes import shape_from_config

        self.device, self.shape = device, shape_from_config(config_dict)
        self.reader = CheckpointReader(path)
        self.model = skeleton_model(path, config_dict, dtype)
        self.layout = model_layout(self.model)
        self.layers = ops.get_module(self.model, self.layout.spec.layers)
        for name, buf in list(self.model.named_buffers()):  # rotary frequencies, Gemma's embedding scale, ...
            owner, _, attr = name.rpartition(".")
            # meta ones are the surgery modules' persistent placeholders: their stored values come with their block
            setattr(self.model.get_submodule(owner), attr, torch.empty_like(buf, device=device) if buf.is_meta
                    else buf.to(device))

    def fill(self, module: nn.Module, prefix: str) -> None:
        _fill(module, prefix, self.reader, self.device, self.shape)

    def fill_top(self) -> None:
        """The embeddings (everything the model runs before its first decoder layer)."""
        for name, module in _top_part(self.model, self.layout):
            self.fill(module, f"{name}.")

    def load_block(self, index: int) -> nn.Module:
        """Decoder block `index` with its stored tensors on the device (free it with `.to("meta")`)."""
        layer = self.layers[index]
        self.fill(layer, f"{self.layout.spec.layer_prefix(index)}.")
        return layer


def open_skeleton(path: Path, config_dict: dict, dtype: torch.dtype, device: torch.device | str,
                  top: bool = True) -> Skeleton:
    """`Skeleton` of the checkpoint in `path`, its embeddings loaded when `top`."""
    skeleton = Skeleton(Path(path), config_dict, dtype, torch.device(device))
    if top:
        skeleton.fill_top()
    return skeleton


def _site_layout(layout: ModelLayout, site: LayerSite) -> ModelLayout:
    return replace(layout, layers=[site])


def open_layerwise(source: str, *, allow_pickle: bool = False, trust_remote_code: bool = False, progress=None):
    """Resolve `source` and read its config and tokenizer, not its weights: a `LoadedModel` with model None.

    Raises:
        UserError: pickled weights or remote code (neither can be read one block at a time from safetensors).
    """
    from surgery.loading import LoadedModel, check_config_against_weights, load_tokenizer, read_config
    from surgery.sources import resolve_source

    if trust_remote_code:
        raise UserError("--layerwise builds the model class from transformers itself: it cannot run a model's own "
                        "code (--trust-remote-code); score it without --layerwise")
    resolved = resolve_source(source, allow_pickle=allow_pickle, progress=progress)
    if resolved.pickle_weights:
        raise UserError("--layerwise reads one block at a time from safetensors files, and this model has only "
                        "pickled weights: score it without --layerwise")
    config_dict = read_config(resolved)
    check_config_against_weights(resolved)
    return LoadedModel(model=None, tokenizer=load_tokenizer(resolved), resolved=resolved, config_dict=config_dict)


@torch.no_grad()
def score_checkpoint_layerwise(
    resolved: ResolvedSource,
    config_dict: dict,
    batches: Sequence[torch.Tensor],
    methods: str | Sequence[str] | Sequence[Method],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
    progress: TokenProgress | None = None,
    cancel: threading.Event | None = None,
    phase: PhaseStart | None = None,
) -> dict[str, torch.Tensor]:
    """Score a safetensors checkpoint block by block (see the module docstring); the scores `score_model` gives.

    Args:
        resolved: a resolved source with safetensors weights (HF directory, converted GGUF, surgery checkpoint).
        config_dict: its config.json.
        batches: (B, T) token-id tensors, in order; each batch is a chunk of hidden states between blocks.
        methods: forward-only and weight-only methods (LAYERWISE_METRICS); others are refused.
        device: where the embeddings, the current block and the hidden states live.
        dtype: the weights' dtype (each stored tensor is cast to it, as loading the whole model does).
        autocast_dtype: run the blocks under torch.autocast with this dtype.
        progress: progress(blocks_done, blocks) after each block.
        cancel: checked between batches; raises Cancelled.
        phase: phase("layer by layer", blocks, "blocks") once, before the first block.

    Returns:
        `<module path>/<metric>` -> float32 CPU tensor, as `score_model`.
    """
    from surgery.arch import spec_for_config
    from surgery.importance.methods import check_applicable

    arch = spec_for_config(config_dict)
    if isinstance(methods, str) or (methods and not isinstance(next(iter(methods)), Method)):
        methods = layerwise_methods(methods, arch=arch)
    check_layerwise_methods(methods)
    check_applicable(methods, arch)
    if resolved.pickle_weights:
        raise UserError("--layerwise reads one block at a time from safetensors files, and this model has only "
                        "pickled weights: score it without --layerwise")
    metrics = {m.metric for m in methods}
    batches = [b for b in batches if b.numel()]
    device = torch.device(device)
    data_metrics = metrics - {"sv", "head_magnitude", "neuron_magnitude"}
    if data_metrics and not batches:
        raise UserError("no calibration tokens: pass --data with at least one block of --seq-len tokens")
    skeleton = open_skeleton(resolved.path, config_dict, dtype, device, top=bool(data_metrics))
    model, layout, spec = skeleton.model, skeleton.layout, skeleton.layout.spec
    autocast = autocast_context(device, autocast_dtype)
    xs: list[torch.Tensor] = []
    calls: list[list[tuple]] = []
    if data_metrics:
        xs, calls = capture_layer_calls(model, spec.layers, [b.to(device) for b in batches], autocast)
    hooks = CombinedHooks(layout, metrics)
    if phase is not None:
        phase("layer by layer", len(layout.layers), "blocks")
    out: dict[str, torch.Tensor] = {}
    with hooks:
        for site in layout.layers:
            check_cancel(cancel)
            layer = skeleton.load_block(site.index)
            for b, x in enumerate(xs):
                check_cancel(cancel)
                if site.index == 0:  # counts the tokens once (the runner calls it once per batch of all layers)
                    hooks.start_batch(batches[b].shape, 1.0)
                with autocast():
                    xs[b] = call_layer(layer, x, calls[site.index][b])
                hooks.end_batch()
            one = _site_layout(layout, site)
            out.update(linear_scores(one, metrics & {"sv", "sv_act"}, hooks.input_rms, None, cancel))
            if "neuron_wanda" in metrics:
                out.update(neuron_wanda(one, hooks.input_rms, hooks.tokens))
            out.update(magnitude_scores(one, metrics))
            layer.to("meta")  # frees the block: its tensors were read for this block only
            if progress is not None:
                progress(site.index + 1, len(layout.layers))
        if "channel_norm" in metrics:  # the last of the hidden-size norms it sums over
            norm = ops.get_module(model, spec.final_norm)
            skeleton.fill(norm, f"{spec.final_norm}.")
            for x in xs:
                with autocast():
                    norm(x)
        out.update(hooks.results())
    return dict(sorted(out.items()))


__all__ = ["LAYERWISE_METRICS", "CheckpointReader", "Skeleton", "call_layer", "capture_layer_calls",
           "check_layerwise_methods", "layerwise_method_names", "layerwise_methods", "open_layerwise",
           "open_skeleton", "score_checkpoint_layerwise", "skeleton_model"]
