"""Data-driven plan steps: training-free reconstruction and whitened low rank, layer by layer on calibration text.

Reconstruction (the `reconstruct` step). After a cut, the projection that reads the cut activations (`o_proj`
after heads, `down_proj` after neurons; GPT-2's Conv1D `c_proj`s) is refit so that its output stays as close as
possible to the ORIGINAL model's output of the same projection on the same calibration tokens:

    W' = argmin_W  sum_t ||W a_t + b - y_t||^2 + lam ||W - W_cut||^2,   lam = ridge * mean(diag(G))
       = (C + lam W_cut) (G + lam I)^-1     with G = sum_t a_t a_t^T (kept inputs), C = sum_t y_t a_t^T

(a ones column joins a_t when the projection has a bias; the bias is not penalised). G and C are summed in float64
over every calibration token, then one Cholesky solve per projection. The ridge pulls toward the plain cut's
weights W_cut (the original's kept columns), not toward zero: a large ridge gives back the plain cut, never a
collapsed layer, and the refit's calibration error can never exceed the cut's. Why it matters: with a few thousand
tokens for ~1,000 inputs a free least-squares fit overfits the calibration text (measured on the demo,
docs/benchmarks.md). y_t always comes from the original model on
the original residual stream; a_t comes from the pruned model, fed either by the already-pruned and refit prefix
(`inputs: "pruned"`: later layers also absorb what earlier cuts changed) or by the original residual stream
(`inputs: "original"`: each layer is fit in isolation). Should round-off ever make the refit's calibration error
exceed the plain cut's, the cut weights are kept.

Whitened low rank (`low_rank` with `"method": "whitened"`, SVD-LLM). With G = S S^T the Cholesky factor of the
Linear's input Gram matrix, the rank-r truncation of the SVD W S = U Sigma V^T gives B = U_r Sigma_r^1/2,
A = Sigma_r^1/2 V_r^T S^-1: the rank-r matrix closest to W in output error on the calibration inputs,
||(W - BA) X||_F, not in ||W - BA||_F as a plain SVD.

Activation-scaled low rank (`"method": "asvd"`, Yuan et al. 2023): the SVD of W diag(s)^alpha, s the per-input-
channel mean |x| on the calibration tokens, truncated, the scaling undone on the right factor
(`surgery.linalg.asvd_factors`). A diagonal heuristic: unlike whitened it carries no optimality guarantee, and it
needs no full-rank Gram matrix.

Layers are processed in order; each pass calls the decoder layer directly with the arguments the model's own
forward passes it (caught once per batch), so no family-specific forward code is needed.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from surgery import ops
from surgery.data import TokenBlocks, load_blocks
from surgery.errors import FingerprintMismatch, UserError
from surgery.linalg import asvd_factors, svd64
from surgery.metrics.common import check_cancel
from surgery.plan import ASVD_ALPHA, DATA_RANK_METHODS, Calibration, Plan, Reconstruct
from surgery.resolve import LayerCut, Resolution
from surgery.stream.fitted import data_rank_modules, refit_readers

Progress = Callable[[int, int, str], None]

# Damping added to a whitening Gram matrix (relative to its mean diagonal) so that its Cholesky factor exists
# when some input direction never occurs in the calibration text (e.g. a dead neuron).
WHITEN_DAMP = 1e-6


@dataclass
class FitRecord:
    """What one refit achieved on the calibration tokens (squared errors summed over tokens)."""

    module: str
    inputs: int
    error_cut: float  # ||W_cut a - y||^2: the plain cut
    error_fit: float  # the refit (equal to error_cut when the refit was not kept)
    target: float  # ||y||^2
    kept: bool  # False: round-off made the refit worse than the cut, the cut weights stayed


@dataclass
class DataReport:
    """What the data-driven steps did: one FitRecord per refit projection, the whitened Linears."""

    fits: list[FitRecord] = field(default_factory=list)
    whitened: list[str] = field(default_factory=list)
    asvd: list[str] = field(default_factory=list)
    tokens: int = 0

    def describe(self) -> dict:
        return {
            "tokens": self.tokens,
            "whitened": list(self.whitened),
            "asvd": list(self.asvd),
            "refits": [vars(f) for f in self.fits],
        }


class _Stop(Exception):
    """Raised from a hook once the activations a pass needs are captured: the rest of the layer is skipped."""


def load_calibration(cal: Calibration, tokenizer) -> TokenBlocks:
    """The plan's calibration tokens, refused when they are not the ones the plan was computed on."""
    blocks = load_blocks(cal.source, tokenizer, cal.seq_len, cal.tokens, text_field=cal.text_field)
    if blocks.fingerprint != cal.fingerprint:
        raise FingerprintMismatch(
            f"calibration data {cal.source} gives tokens {blocks.fingerprint[:19]}... but the plan was computed on "
            f"{cal.fingerprint[:19]}... ({blocks.num_tokens} tokens, seq-len {cal.seq_len}): use the same file"
        )
    return blocks


def calibrate_plan(
    plan: Plan,
    config_dict: dict,
    tokenizer,
    data: str,
    *,
    tokens: int,
    seq_len: int,
    batch_size: int = 8,
    text_field: str | None = None,
    reconstruct: Reconstruct | None = None,
    rank_method: str | None = None,
    alpha: float | None = None,
) -> Plan:
    """`plan` with a calibration block for `data`, plus a reconstruct step and/or whitened / asvd low_rank steps.

    `rank_method` sets the method of every low_rank step; `alpha` is asvd's exponent (default ASVD_ALPHA, written
    into each step so the plan says what it replays).

    The block records the tokens actually kept (fewer than `tokens` when the data is short), so validation refuses
    data too short for full-rank Gram matrices with the number of tokens needed.

    Raises:
        PlanError: the result does not validate (e.g. rank-deficient calibration).
        UserError: unreadable data, no data-driven step asked for.
    """
    from surgery.plan import LowRank, parse_plan
    from surgery.resolve import resolve_plan
    from surgery.shapes import shape_from_config

    if reconstruct is None and rank_method in (None, "svd"):
        raise UserError("--data is used by --reconstruct and --rank-method whitened/asvd: pass one of them")
    if rank_method in DATA_RANK_METHODS and not any(isinstance(s, LowRank) for s in plan.steps):
        raise UserError(f"--rank-method {rank_method} needs low_rank steps (--low-rank ... --rank-keep ...)")
    if alpha is not None and rank_method != "asvd":
        raise UserError("--asvd-alpha is only used by --rank-method asvd")
    blocks = load_blocks(data, tokenizer, seq_len, tokens, text_field=text_field)
    cal = Calibration(source=str(data), fingerprint=blocks.fingerprint, tokens=blocks.num_tokens, seq_len=seq_len,
                      batch_size=batch_size, text_field=text_field)
    steps = [s.model_dump(exclude_none=True) for s in plan.steps if not isinstance(s, Reconstruct)]
    if rank_method is not None:
        extra = {"alpha": ASVD_ALPHA if alpha is None else alpha} if rank_method == "asvd" else {}
        steps = [{**{k: v for k, v in s.items() if k != "alpha"}, "method": rank_method, **extra}
                 if s["op"] == "low_rank" else s for s in steps]
    if reconstruct is not None:
        steps.append(reconstruct.model_dump(exclude_none=True))
    doc = {**plan.model_dump(exclude_none=True), "calibration": cal.model_dump(exclude_none=True), "steps": steps}
    new = parse_plan(doc)
    resolve_plan(new, shape_from_config(config_dict))
    return new


def calibrate_for_source(plan: Plan, data: str, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                         **options) -> Plan:
    """`calibrate_plan` for the model the plan names (its config and tokenizer; no weights read)."""
    from surgery.loading import load_tokenizer, read_config
    from surgery.sources import resolve_source

    if plan.model is None:
        raise UserError("the plan names no model: cannot tokenize the calibration data")
    resolved = resolve_source(plan.model.source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise UserError(f"{plan.model.source} has no tokenizer files: cannot tokenize the calibration data")
    return calibrate_plan(plan, read_config(resolved), tokenizer, data, **options)


def check_enough_tokens(resolution: Resolution, blocks: TokenBlocks) -> None:
    """Refuse calibration text too short for full-rank Gram matrices (the data may hold fewer tokens than asked)."""
    from surgery.resolve import data_inputs

    widths = [(c.index, rel, w) for c in resolution.layers for rel, w in data_inputs(c, resolution.shape).items()]
    if not widths:
        return
    layer, rel, width = max(widths, key=lambda x: x[2])
    if blocks.num_tokens < width + 1:
        raise UserError(
            f"calibration data too short: {blocks.num_tokens} tokens give rank-deficient Gram matrices (layer "
            f"{layer} {rel} has {width} inputs): need at least {width + 1} tokens, i.e. "
            f"{-(-(width + 1) // blocks.seq_len)} blocks of {blocks.seq_len}"
        )


def apply_calibrated(
    model: nn.Module,
    resolution: Resolution,
    tokenizer,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    blocks: TokenBlocks | None = None,
) -> DataReport:
    """Apply a resolution with data-driven steps to `model` in place (a copy of the original is kept meanwhile)."""
    from surgery.apply import apply_resolution

    if blocks is None:
        blocks = load_calibration(resolution.calibration, tokenizer)
    check_enough_tokens(resolution, blocks)
    original = copy.deepcopy(model)
    apply_resolution(model, resolution)
    return run_data_steps(original, model, resolution, blocks, progress, cancel)


def _call(layer: nn.Module, x: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs = call
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _hook(module: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], None], stop: bool) -> Iterator[None]:
    def hook(_m, inputs, output):
        fn(inputs[0], output)
        if stop:
            raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).to(torch.float64)


def _run_to(layer: nn.Module, module: nn.Module, xs: list, calls: list, fn: Callable) -> None:
    """Run `layer` on every batch until `module` has produced its output; `fn(batch, input, output)`."""
    for b, x in enumerate(xs):
        with _hook(module, lambda a, y, b=b: fn(b, a, y), stop=True), contextlib.suppress(_Stop):
            _call(layer, x, calls[b])


def _weight_and_bias(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """[W | b] (out, in[+1]) in float64."""
    w = ops.linear_weight(module, conv1d).detach().to(torch.float64)
    bias = getattr(module, "bias", None)
    return torch.cat([w, bias.detach().to(torch.float64)[:, None]], 1) if bias is not None else w


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float, n_free: int, where: str,
                prior: torch.Tensor) -> torch.Tensor:
    """argmin_W ||W A - Y||^2 + lam ||(W - prior)[:, :n_free]||^2 from G = A A^T, C = Y A^T (float64).

    lam = ridge * mean(diag(G)[:n_free]); columns from n_free on (a bias) are not penalised.
    """
    lam = ridge * float(gram.diagonal()[:n_free].mean()) if n_free else 0.0
    damped = gram.clone()
    damped.diagonal()[:n_free] += lam
    cross = cross.clone()
    cross[:, :n_free] += lam * prior[:, :n_free]
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info):
        raise UserError(f"{where}: the calibration activations' Gram matrix is singular (rank-deficient): use more "
                        "calibration tokens or a ridge > 0")
    return torch.cholesky_solve(cross.t(), chol).t()  # (out, in[+1])


def _sq_error(w: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, target: float) -> float:
    """sum_t ||w a_t - y_t||^2 from the Gram statistics."""
    return float((w @ gram * w).sum() - 2 * (w * cross).sum() + target)


def refit_reader(layer: nn.Module, rel: str, xs: list, calls: list, targets: list, ridge: float, conv1d: bool,
                 where: str) -> FitRecord:
    """Refit the Linear at layer-relative `rel` so its outputs match `targets` (per batch) by ridge least squares."""
    module = ops.get_module(layer, rel)
    has_bias = getattr(module, "bias", None) is not None
    stats: dict[str, torch.Tensor | float] = {}

    def accumulate(b: int, a: torch.Tensor, _y: torch.Tensor) -> None:
        a = _rows(a)
        if has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        y = _rows(targets[b])
        stats["gram"] = stats.get("gram", 0) + a.t() @ a
        stats["cross"] = stats.get("cross", 0) + y.t() @ a
        stats["target"] = stats.get("target", 0.0) + float((y * y).sum())

    _run_to(layer, module, xs, calls, accumulate)
    gram, cross, target = stats["gram"], stats["cross"], stats["target"]
    n_in = gram.shape[0] - int(has_bias)
    w_cut = _weight_and_bias(module, conv1d)
    w_fit = ridge_solve(gram, cross, ridge, n_in, where, prior=w_cut)
    e_cut, e_fit = _sq_error(w_cut, gram, cross, target), _sq_error(w_fit, gram, cross, target)
    kept = e_fit <= e_cut
    if kept:
        _set_weight(module, w_fit, n_in, conv1d)
    return FitRecord(where, n_in, e_cut, e_fit if kept else e_cut, target, kept)


def _set_weight(module: nn.Module, w: torch.Tensor, n_in: int, conv1d: bool) -> None:
    dtype = module.weight.dtype
    weight = w[:, :n_in].to(dtype)
    module.weight = nn.Parameter((weight.t() if conv1d else weight).contiguous(),
                                 requires_grad=module.weight.requires_grad)
    if n_in < w.shape[1]:
        module.bias = nn.Parameter(w[:, n_in].to(dtype).contiguous(), requires_grad=module.bias.requires_grad)


def whitened_factors(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, r), A (r, in) minimising ||(W - B A) X||_F for inputs with Gram matrix G = X X^T (SVD-LLM).

    sqrt(sigma) goes to each side, as in `surgery.ops.low_rank_factors`.
    """
    g = gram.to(torch.float64)
    damped = g + WHITEN_DAMP * float(g.diagonal().mean()) * torch.eye(g.shape[0], dtype=g.dtype)
    s = torch.linalg.cholesky(damped)  # lower: G = S S^T
    u, sigma, vh = svd64(weight.detach().to(torch.float64) @ s)
    root = sigma[:rank].sqrt()
    b = u[:, :rank] * root  # (out, r)
    a = torch.linalg.solve_triangular(s, root[:, None] * vh[:rank], upper=False, left=False)  # (r, in) = R S^-1
    return b.to(weight.dtype), a.to(weight.dtype)


def _whiten(layer: nn.Module, rels: dict[str, tuple], xs: list, calls: list, conv1d: bool) -> None:
    """Replace each Linear in `rels` (rel -> (method, rank, alpha)) by its whitened or activation-scaled (asvd)
    factorisation, from one pass over the data: Gram matrices for whitened, per-channel sums of |x| for asvd."""
    stats: dict[str, torch.Tensor] = {}
    rows = 0
    for b, x in enumerate(xs):
        with contextlib.ExitStack() as stack:
            for rel, (method, _, _) in rels.items():
                def grab(a, _y, rel=rel, method=method):
                    a = _rows(a)
                    stats[rel] = stats.get(rel, 0) + (a.t() @ a if method == "whitened" else a.abs().sum(0))
                stack.enter_context(_hook(ops.get_module(layer, rel), grab, stop=False))
            _call(layer, x, calls[b])
        rows += x.shape[0] * x.shape[1]
    for rel, (method, rank, alpha) in rels.items():
        linear = ops.get_module(layer, rel)
        weight = ops.linear_weight(linear, conv1d)
        factors = (whitened_factors(weight, stats[rel], rank) if method == "whitened"
                   else asvd_factors(weight, stats[rel] / rows, rank, alpha))
        ops.set_module(layer, rel, ops.make_low_rank(linear, rank, conv1d, factors))


def _whitened(cut: LayerCut) -> dict[str, tuple]:
    """The layer's data-driven low_rank steps: rel -> (method, rank, alpha)."""
    return {rel: (cut.low_rank_method[rel], cut.low_rank[rel], cut.low_rank_alpha.get(rel))
            for rel in data_rank_modules(cut)}


def fit_layer(cut: LayerCut, spec, step: Reconstruct | None, orig_layer: nn.Module, layer: nn.Module | None,
              x_o: list, xs: list, calls_o: list, calls_p: list | None, report: DataReport) -> list[torch.Tensor]:
    """One layer of the data-driven steps: runs the original layer on `x_o` (per batch, its inputs from the
    original model) recording the refit targets, then fits the cut `layer` (None when dropped) on `xs`: whitened
    / asvd factorisations first, then the o_proj refit, then the down_proj refit (which therefore sees the refit
    attention output). Appends to `report`; returns the original layer's outputs (the next layer's `x_o`)."""
    i = cut.index
    readers = refit_readers(cut, spec) if not cut.dropped else {}
    targets: dict[str, list] = {rel: [] for rel in readers.values()}
    with contextlib.ExitStack() as stack:
        for rel in readers.values():
            stack.enter_context(_hook(ops.get_module(orig_layer, rel),
                                      lambda _a, y, rel=rel: targets[rel].append(y), stop=False))
        x_o_next = [_call(orig_layer, x, calls_o[b]) for b, x in enumerate(x_o)]
    if layer is not None:
        if whitened := _whitened(cut):
            _whiten(layer, whitened, xs, calls_p, spec.conv1d)
            for rel, (method, _, _) in whitened.items():
                (report.whitened if method == "whitened" else report.asvd).append(f"{spec.layer_prefix(i)}.{rel}")
        for rel in readers.values():
            report.fits.append(refit_reader(layer, rel, xs, calls_p, targets[rel], step.ridge, spec.conv1d,
                                            f"{spec.layer_prefix(i)}.{rel}"))
    return x_o_next


@torch.no_grad()
def run_data_steps(
    original: nn.Module,
    model: nn.Module,
    resolution: Resolution,
    blocks: TokenBlocks,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> DataReport:
    """Run the resolution's data-driven steps on `model` (already cut by `apply_resolution`), layer by layer.

    `original` is the uncut model the resolution was made against; it supplies the targets and is not changed.
    Within one layer: see `fit_layer`.
    """
    spec, step = resolution.shape.spec, resolution.reconstruct
    carry = step is None or step.inputs == "pruned"
    batch_size = resolution.calibration.batch_size if resolution.calibration else 8
    batches = list(blocks.batches(batch_size))
    work = [c for c in resolution.layers if not c.dropped and (c.refit or _whitened(c))]
    report = DataReport(tokens=blocks.num_tokens)
    if not work:
        return report
    last = work[-1].index
    from surgery.importance.layerwise import capture_layer_calls

    x_o, calls_o = capture_layer_calls(original, spec.layers, batches)  # per batch; per layer, per batch
    x_p, calls_p = capture_layer_calls(model, spec.layers, batches)
    orig_layers, layers = ops.get_module(original, spec.layers), ops.get_module(model, spec.layers)
    position = {cut.index: j for j, cut in enumerate(resolution.kept_layers)}
    for cut in resolution.layers[: last + 1]:
        check_cancel(cancel)
        i = cut.index
        j = None if cut.dropped else position[i]
        layer = None if j is None else layers[j]
        x_o_next = fit_layer(cut, spec, step, orig_layers[i], layer, x_o, x_p if carry else x_o, calls_o[i],
                             None if j is None else calls_p[j], report)
        if layer is not None and carry and i < last:
            x_p = [_call(layer, x, calls_p[j][b]) for b, x in enumerate(x_p)]
        x_o = x_o_next
        if progress:
            progress(i + 1, last + 1, "layers")
    return report


__all__ = [
    "DataReport",
    "FitRecord",
    "apply_calibrated",
    "calibrate_for_source",
    "calibrate_plan",
    "check_enough_tokens",
    "fit_layer",
    "load_calibration",
    "refit_reader",
    "ridge_solve",
    "run_data_steps",
    "whitened_factors",
]
