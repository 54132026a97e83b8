"""The ablation reference: the exact increase of the mean calibration loss when one head or one layer is removed.

One forward over all calibration tokens per component. Removing something in layer l cannot change layers
0..l-1, so their output (the input of layer l, `h_l`) is computed once per layer and replayed: the layers before
l are swapped for pass-through stubs and a pre-hook on layer l feeds it the cached `h_l`. That roughly halves the
cost; `h_l` for all calibration tokens is one (tokens x hidden) tensor, freed when the next layer starts.

"Removed" means what `surgery.mask` means: a head's slice of the o_proj input is zeroed; a layer's output is its
input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from surgery.importance.layout import ModelLayout
from surgery.ops import get_module


class _Passthrough(nn.Module):
    """Stands in for a decoder layer whose output is replayed: returns its hidden-state input unchanged."""

    def __init__(self, attention_type: str | None):
        super().__init__()
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, *args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]


class _Stop(Exception):
    """Raised from a hook to end a forward early once the wanted hidden state is captured."""


def _hidden_in(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def batch_loss_sum(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies of a (B, T) batch, in float32."""
    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    targets = ids[:, 1:].flatten().to(logits.device)  # the last layer's device under a device_map
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, reduction="sum")


class Ablator:
    """Runs the ablation passes of `head_ablate` / `layer_ablate` over fixed calibration batches."""

    def __init__(
        self,
        model: nn.Module,
        layout: ModelLayout,
        batches: list[torch.Tensor],
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager],
        step: Callable[[int], None],
    ):
        self.model, self.layout, self.batches = model, layout, batches
        self.device, self.autocast, self.step = device, autocast, step
        self.num_targets = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
        self.layers = get_module(model, layout.spec.layers)
        self._batch = 0

    def mean_loss(self) -> float:
        """Mean next-token loss over all calibration targets, with whatever hooks are installed."""
        total = 0.0
        for i, ids in enumerate(self.batches):
            self._batch = i
            with self.autocast():
                total += float(batch_loss_sum(self.model, ids.to(self.device)))
            self.step(ids.numel())
        return total / self.num_targets

    def capture_input(self, layer: int, replay: list[torch.Tensor] | None, from_layer: int) -> list[torch.Tensor]:
        """The input hidden states of `layer` for every batch (running only what is needed)."""
        cached: list[torch.Tensor] = []

        def grab(module, args, kwargs):
            cached.append(_hidden_in(args, kwargs).detach())
            raise _Stop

        handle = self.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with self.replaying(from_layer, replay):
                for i, ids in enumerate(self.batches):
                    self._batch = i
                    with contextlib.suppress(_Stop), self.autocast():
                        self.model(input_ids=ids.to(self.device), use_cache=False)
        finally:
            handle.remove()
        return cached

    @contextlib.contextmanager
    def replaying(self, layer: int, cached: list[torch.Tensor] | None) -> Iterator[None]:
        """Layers before `layer` become pass-throughs and layer `layer` reads `cached[batch]` as its input."""
        if not cached or layer == 0:
            yield
            return
        originals = [self.layers[i] for i in range(layer)]

        def feed(module, args, kwargs):
            return _with_hidden(args, kwargs, cached[self._batch])

        handle = self.layers[layer].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            for i, orig in enumerate(originals):
                self.layers[i] = _Passthrough(getattr(orig, "attention_type", None))
            yield
        finally:
            handle.remove()
            for i, orig in enumerate(originals):
                self.layers[i] = orig


def _zero_head(head: int, head_dim: int):
    def hook(module, args):
        x = args[0].clone()
        x[..., head * head_dim : (head + 1) * head_dim] = 0
        return (x, *args[1:])

    return hook


def _identity_layer(module, args, kwargs, output):
    hidden = _hidden_in(args, kwargs)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def ablation_passes(layout: ModelLayout, metrics: set[str]) -> int:
    """How many full passes over the calibration tokens `run_ablation` makes (for progress totals)."""
    passes = 1  # the unablated baseline
    if "head_ablate" in metrics:
        passes += sum(s.heads for s in layout.layers if s.o_proj is not None)
    if "layer_ablate" in metrics:
        passes += len(layout.layers)
    return passes


@torch.no_grad()
def run_ablation(ablator: Ablator, metrics: set[str], cancel=None) -> dict[str, torch.Tensor]:
    """head_ablate ([heads] per attention module) and layer_ablate ([layers]); loss increases, float32."""
    from surgery.importance.runner import check_cancel

    layout = ablator.layout
    base = ablator.mean_loss()
    out: dict[str, torch.Tensor] = {}
    layer_scores = torch.zeros(len(layout.layers))
    cached: list[torch.Tensor] | None = None
    for site in layout.layers:
        check_cancel(cancel)
        # h_l for every batch: from the previous layer's cache, running one layer only
        cached = ablator.capture_input(site.index, cached, max(site.index - 1, 0)) if site.index else None
        with ablator.replaying(site.index, cached):
            if "head_ablate" in metrics and site.o_proj is not None:
                scores = torch.zeros(site.heads)
                for h in range(site.heads):
                    check_cancel(cancel)
                    handle = site.o_proj.register_forward_pre_hook(_zero_head(h, site.head_dim))
                    try:
                        scores[h] = ablator.mean_loss() - base
                    finally:
                        handle.remove()
                out[f"{site.attn_path}/head_ablate"] = scores
            if "layer_ablate" in metrics:
                check_cancel(cancel)
                handle = site.module.register_forward_hook(_identity_layer, with_kwargs=True)
                try:
                    layer_scores[site.index] = ablator.mean_loss() - base
                finally:
                    handle.remove()
    if "layer_ablate" in metrics:
        out[f"{layout.model_path}/layer_ablate"] = layer_scores
    return out
