"""Scores computed from weights (plus the activation and gradient statistics of the combined pass).

- `sv`: singular values of each decoder Linear's (out, in) weight, in the order torch.linalg.svd returns them
  (descending);
- `sv_act`: singular values of W diag(rms), rms_j the RMS of input channel j over the calibration tokens;
- `sv_grad`: for W = U diag(sigma) V^T, dL/dsigma_i = u_i^T (dL/dW) v_i with dL/dW the gradient of the mean loss
  over all calibration tokens (Compress to Impress, arXiv 2510.20800); signed;
- `neuron_wanda`: ||W_down[:, j]||_1 * ||X_j||_2 (Wanda's |W| * ||X|| summed over the neuron's column);
- `head_magnitude`, `neuron_magnitude`: data-free baselines (L2 norm of the weights a head / neuron owns).

On a GPU the SVD is torch.linalg.svd in float32 on the weight's device; on CPU it goes through the Gram matrix in
float64 (see `spectra`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from surgery.importance.layout import LayerSite, ModelLayout, weight_out_in

RmsFn = Callable[[str], "torch.Tensor | None"]


def _descending_roots(lam: torch.Tensor) -> torch.Tensor:
    return lam.flip(0).clamp_min(0).sqrt()


def spectra(w: torch.Tensor, *, vectors: bool = False, values: bool = True, rms: torch.Tensor | None = None):
    """Singular values (and vectors) of an (out, in) matrix W, and those of W diag(rms).

    Returns:
        (u (out, r), s (r,), vh (r, in), s_act (r,)), r = min(out, in), s descending; u / vh are None unless
        `vectors`, s is None unless `values` or `vectors`, s_act is None unless `rms` is given.

    On a GPU: torch.linalg.svd / svdvals in float32. On CPU: the eigen-decomposition of the smaller Gram matrix in
    float64 (A A^T = Q S^2 Q^T; the other side's vectors are S^-1 Q^T A), which is faster than LAPACK's float32
    SVD for these shapes and as accurate on their small singular values; vectors of (numerically) zero singular
    values come out as zeros. For a tall W the Gram matrix is W^T W, and diag(rms) W^T W diag(rms) gives the
    activation-scaled spectrum without a second product.
    """
    u = s = vh = s_act = None
    if w.device.type != "cpu":
        wf = w.float()
        if vectors:
            u, s, vh = torch.linalg.svd(wf, full_matrices=False)
        elif values:
            s = torch.linalg.svdvals(wf)
        if rms is not None:
            s_act = torch.linalg.svdvals(wf * rms.to(wf)[None, :])
        return u, s, vh, s_act
    a = w.detach().double()
    tall = a.shape[0] > a.shape[1]
    if tall:
        a = a.t()  # (r, n), r <= n
    gram = a @ a.t() if (vectors or values or (rms is not None and tall)) else None  # (r, r)
    if vectors:
        lam, q = torch.linalg.eigh(gram)  # ascending
        q = q.flip(1)
        s = _descending_roots(lam)  # (r,)
        limit = s[0] * torch.finfo(torch.float64).eps * max(a.shape) ** 2 if s.numel() else 0
        inv = torch.where(s <= limit, torch.zeros_like(s), 1 / s.clamp_min(torch.finfo(torch.float64).tiny))
        other = (q.t() @ a) * inv[:, None]  # (r, n): the other side's singular vectors, as rows
        u, vh = (other.t(), q.t()) if tall else (q, other)
    elif values:
        s = _descending_roots(torch.linalg.eigvalsh(gram))
    if rms is not None:
        r = rms.to(a)
        if tall:  # gram = W^T W, indexed by input channels
            scaled = gram * r[:, None] * r[None, :]
        else:
            ar = a * r[None, :]  # W diag(rms)
            scaled = ar @ ar.t()
        s_act = _descending_roots(torch.linalg.eigvalsh(scaled))
    return u, s, vh, s_act


@torch.no_grad()
def linear_scores(
    layout: ModelLayout,
    metrics: set[str],
    rms: RmsFn | None = None,
    grads: dict[str, torch.Tensor] | None = None,
    cancel=None,
    step: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """sv / sv_act / sv_grad for every dense decoder Linear.

    Args:
        layout: the model's sites.
        metrics: which of "sv", "sv_act", "sv_grad" to compute.
        rms: path -> per-input-channel RMS (needed for sv_act).
        grads: path -> dL/dW in the module's own layout (needed for sv_grad).
        cancel: a threading.Event checked between matrices.
        step: called after each matrix (the progress of this phase).
    """
    out: dict[str, torch.Tensor] = {}
    for site in layout.layers:
        for path, module in site.linears.items():
            if cancel is not None and cancel.is_set():
                from surgery.importance.runner import Cancelled

                raise Cancelled("scoring cancelled")
            w = weight_out_in(module, layout.conv1d).detach()  # (out, in)
            want_grad = "sv_grad" in metrics and grads is not None and path in grads
            r = rms(path) if "sv_act" in metrics and rms is not None else None
            if not ("sv" in metrics or want_grad or r is not None):
                if step is not None:
                    step()
                continue
            u, s, vh, s_act = spectra(w, vectors=want_grad, values="sv" in metrics, rms=r)
            if "sv" in metrics:
                out[f"{path}/sv"] = s.float().cpu()
            if want_grad:
                g = grads[path].to(device=w.device, dtype=s.dtype)
                g = g.t() if layout.conv1d else g  # (out, in)
                out[f"{path}/sv_grad"] = ((u.t() @ g) * vh).sum(1).float().cpu()  # u_i^T G v_i, (r,)
            if s_act is not None:
                out[f"{path}/sv_act"] = s_act.float().cpu()
            if step is not None:
                step()
    return out


@torch.no_grad()
def neuron_wanda(layout: ModelLayout, rms: RmsFn, tokens: int) -> dict[str, torch.Tensor]:
    """||W_down[:, j]||_1 * ||X_j||_2 per neuron, ||X_j||_2 over all calibration tokens (= rms_j * sqrt(n))."""
    out: dict[str, torch.Tensor] = {}
    for site in layout.layers:
        if site.down is None or not hasattr(site.down, "weight"):
            continue
        r = rms(f"{site.mlp_path}.{layout.spec.down}")
        if r is None:
            continue
        w = weight_out_in(site.down, layout.conv1d).float()  # (hidden, width)
        norm_x = r.to(w.device) * tokens**0.5  # (width,)
        out[f"{site.mlp_path}/neuron_wanda"] = (w.abs().sum(0) * norm_x).cpu()
    return out


def _head_magnitude(site: LayerSite, layout: ModelLayout) -> torch.Tensor:
    spec, hd, h = layout.spec, site.head_dim, site.heads
    attn = site.module.get_submodule(spec.attn)
    o = weight_out_in(site.o_proj, layout.conv1d).float()  # (hidden, H * hd)
    sq = o.pow(2).sum(0).view(h, hd).sum(1)  # (H,)
    q_mod = attn.get_submodule(spec.qkv or spec.q)
    if hasattr(q_mod, "weight"):
        q = weight_out_in(q_mod, layout.conv1d).float()[: h * hd]  # q rows come first in fused layouts
        sq = sq + q.pow(2).sum(1).view(h, hd).sum(1)
    return sq.sqrt()


def _neuron_magnitude(site: LayerSite, layout: ModelLayout) -> torch.Tensor:
    spec, width = layout.spec, site.width
    mlp = site.module.get_submodule(spec.mlp)
    sq = weight_out_in(site.down, layout.conv1d).float().pow(2).sum(0)  # (width,)
    names = (spec.gate_up,) if spec.gate_up else tuple(n for n in (spec.gate, spec.up) if n)
    for name in names:
        w = weight_out_in(mlp.get_submodule(name), layout.conv1d).float()  # (width or 2 * width, hidden)
        sq = sq + w.pow(2).sum(1).view(-1, width).sum(0)  # fused [gate | up] rows fold onto the width index
    return sq.sqrt()


@torch.no_grad()
def magnitude_scores(layout: ModelLayout, metrics: set[str]) -> dict[str, torch.Tensor]:
    """head_magnitude / neuron_magnitude (data-free baselines)."""
    out: dict[str, torch.Tensor] = {}
    for site in layout.layers:
        if "head_magnitude" in metrics and site.o_proj is not None and hasattr(site.o_proj, "weight"):
            out[f"{site.attn_path}/head_magnitude"] = _head_magnitude(site, layout).cpu()
        if "neuron_magnitude" in metrics and site.down is not None and hasattr(site.down, "weight"):
            out[f"{site.mlp_path}/neuron_magnitude"] = _neuron_magnitude(site, layout).cpu()
    return out
