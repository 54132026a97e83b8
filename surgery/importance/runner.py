"""Run the scoring methods over calibration batches: one combined forward+backward per batch for every
gradient- and activation-based method, then the ablation passes (if asked for), then the SVDs.

Memory stays bounded: per batch, the hooks add into one small tensor per component; the only model-sized buffer
is dL/dW of the decoder Linears when `sv_grad` is asked for (accumulated over batches as the gradient of the mean
loss over all calibration tokens). Parameters that nothing needs get no gradient: without `sv_grad`, no weight
gradient is computed at all (only activation gradients).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import UserError
from surgery.importance.ablate import Ablator, ablation_passes, run_ablation
from surgery.importance.hooks import FORWARD_METRICS, GRAD_METRICS, CombinedHooks
from surgery.importance.layout import ModelLayout, model_layout
from surgery.importance.methods import Method, check_applicable, parse_methods
from surgery.importance.weights import linear_scores, magnitude_scores, neuron_wanda

TokenProgress = Callable[[int, int], None]
# phase(name, total, unit) announces a phase; progress(done, total) then counts within it: "passes" in tokens
# (forward/backward and ablation passes), "singular values" in matrices (the SVDs, minutes on a big model)
PhaseStart = Callable[[str, int, str], None]


class Cancelled(UserError):
    """The caller set the cancel event; nothing was written."""


def check_cancel(cancel: threading.Event | None, what: str = "scoring") -> None:
    """Raise Cancelled ("<what> cancelled") when `cancel` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} cancelled")


def input_device(layout: ModelLayout) -> torch.device:
    """Where token ids go: the embedding's device (the first device of a model spread with a device_map)."""
    return layout.embed.weight.device


AutocastFactory = Callable[[], contextlib.AbstractContextManager]


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AutocastFactory:
    """A factory of autocast contexts (a no-op when `dtype` is None)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class _GradState:
    """Turns on requires_grad for exactly the weights sv_grad needs; restores every flag and .grad afterwards."""

    def __init__(self, model: nn.Module, layout: ModelLayout, want_weights: bool):
        self.params = list(model.parameters())
        self.saved = [(p, p.requires_grad, p.grad) for p in self.params]
        self.targets: dict[str, nn.Parameter] = {}
        if want_weights:
            for site in layout.layers:
                for path, module in site.linears.items():
                    self.targets[path] = module.weight
        self.acc: dict[str, torch.Tensor] = {}

    def __enter__(self) -> _GradState:
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None
        for p in self.targets.values():
            p.requires_grad_(True)
        return self

    def collect(self) -> None:
        """After a backward: move .grad into float32 accumulators (bf16 grads would lose the small terms)."""
        for path, p in self.targets.items():
            if p.grad is None:
                continue
            if path in self.acc:
                self.acc[path] += p.grad.float()
            else:
                self.acc[path] = p.grad.float() if p.grad.dtype != torch.float32 else p.grad
            p.grad = None

    def __exit__(self, *exc) -> None:
        for p, flag, grad in self.saved:
            p.requires_grad_(flag)
            p.grad = grad


def score_model(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    methods: str | Sequence[str] | Sequence[Method],
    *,
    autocast_dtype: torch.dtype | None = None,
    progress: TokenProgress | None = None,
    cancel: threading.Event | None = None,
    phase: PhaseStart | None = None,
) -> dict[str, torch.Tensor]:
    """Score a loaded model on calibration batches.

    Args:
        model: a supported causal LM (any family in surgery.arch), on any device; left as it was found.
        batches: (B, T) int64 token-id tensors, in order (e.g. `TokenBlocks.batches(batch_size)`); each block
            predicts its own next tokens.
        methods: method names ("head-grad,neuron-taylor", a list, or Method objects; see surgery.importance). An
            alias (fast, all) keeps only the axes the model has; a named channel method on a family prune_hidden
            cannot cut, or an expert method on a dense model, is a UserError.
        autocast_dtype: run forward passes under torch.autocast with this dtype (bf16 on GPU).
        progress: called as progress(tokens_done, tokens_total) after each batch of each pass.
        cancel: checked between batches; when set, raises Cancelled.
        phase: called as phase(name, total, unit) when a phase starts ("passes" in tokens, "singular values" in
            matrices); `progress` then counts within that phase.

    Returns:
        `<module path>/<metric>` -> float32 CPU tensor (see docs/scoring.md for every name and shape).
    """
    layout = model_layout(model)
    if isinstance(methods, str) or (methods and not isinstance(next(iter(methods)), Method)):
        methods = parse_methods(methods, arch=layout.spec)  # aliases keep only the axes this model has
    check_applicable(methods, layout.spec)
    metrics = {m.metric for m in methods}
    batches = [b for b in batches if b.numel()]
    if not batches and metrics - {"sv", "head_magnitude", "neuron_magnitude"}:
        raise UserError("no calibration tokens: pass --data with at least one block of --seq-len tokens")
    device = input_device(layout)
    autocast = autocast_context(device, autocast_dtype)
    tokens_per_pass = sum(b.numel() for b in batches)
    data_pass = bool(metrics & (GRAD_METRICS | FORWARD_METRICS | {"sv_grad"}))
    ablating = metrics & {"head_ablate", "layer_ablate"}
    total = tokens_per_pass * (int(data_pass) + (ablation_passes(layout, metrics) if ablating else 0))
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    was_training = model.training
    model.eval()  # no dropout: scores must be deterministic
    out: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    hooks = CombinedHooks(layout, metrics)
    if phase is not None and total:
        phase("passes", total, "tokens")
    try:
        if data_pass:
            grads = _combined_pass(model, layout, batches, metrics, hooks, autocast, step, cancel)
            out.update(hooks.results())
            if "neuron_wanda" in metrics:
                out.update(neuron_wanda(layout, hooks.input_rms, hooks.tokens))
        if ablating:
            ablator = Ablator(model, layout, batches, device, autocast, step)
            out.update(run_ablation(ablator, metrics, cancel))
        sv_metrics = metrics & {"sv", "sv_act", "sv_grad"}
        matrices = sum(len(site.linears) for site in layout.layers) if sv_metrics else 0
        if phase is not None and matrices:
            phase("singular values", matrices, "matrices")
        svd_done = 0

        def svd_step() -> None:
            nonlocal svd_done
            svd_done += 1
            if progress is not None:
                progress(svd_done, matrices)

        out.update(linear_scores(layout, sv_metrics, hooks.input_rms, grads, cancel,
                                 step=svd_step if matrices else None))
        out.update(magnitude_scores(layout, metrics))
    finally:
        model.train(was_training)
    return dict(sorted(out.items()))


def _combined_pass(model, layout, batches, metrics, hooks, autocast, step, cancel) -> dict[str, torch.Tensor]:
    """The one forward(+backward) per batch; returns accumulated dL/dW per Linear when sv_grad is asked for."""
    backward = bool(metrics & (GRAD_METRICS | {"sv_grad"}))
    num_targets = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    device = input_device(layout)
    with _GradState(model, layout, "sv_grad" in metrics) as grad_state, hooks:
        for ids in batches:
            check_cancel(cancel)
            ids = ids.to(device)
            weight = ids.shape[0] * (ids.shape[1] - 1) / num_targets  # this batch's share of all targets
            hooks.start_batch(ids.shape, weight)
            with torch.set_grad_enabled(backward), autocast():
                logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
            targets = ids[:, 1:].flatten().to(logits.device)  # the last layer's device under a device_map
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets)  # L_b
            if backward:
                # d(weight * L_b): parameter grads then add up to d(mean loss over all tokens)/dW
                (loss * weight).backward()
                grad_state.collect()
            hooks.end_batch()
            del logits, loss
            step(ids.numel())
        return dict(grad_state.acc)
