"""The thin float64 SVD that `low_rank` (surgery.ops) and its oracle (surgery.mask) share, and the activation-scaled
factorisation of ASVD built on it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

# Matrices up to this many rows and columns are factorised on one CPU thread. Why: MKL's threaded LAPACK SVD
# spin-waits whenever another process holds a core. On this project's shared 2-core machine (load ~3-4) a
# 1536 x 576 float64 SVD took 0.18-0.24 s on one thread and 6.8-11.7 s on two; 2048 x 2048 took 4.9-5.6 s vs
# 31-43 s (2026-11-30). Larger matrices keep torch's thread count, where threads pay off on an idle machine.
SINGLE_THREAD_MAX = 4096

_THREADS_LOCK = threading.Lock()  # torch.set_num_threads is process-wide: one change at a time


@contextlib.contextmanager
def _one_thread(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    with _THREADS_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def svd64(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of an (out, in) matrix in float64: u (out, r), s (r,) descending, vh (r, in), r = min(out, in).

    float64 so that a full-rank truncation reproduces a float32 W to round-off.
    """
    small = weight.device.type == "cpu" and max(weight.shape) <= SINGLE_THREAD_MAX
    with _one_thread(small):
        return torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)


# ASVD's guard for input channels that are (almost) never active: their scale mean|x|^alpha is floored at this
# fraction of the mean scale, so the scaling stays invertible and its condition number (which multiplies the SVD's
# round-off when the scaling is undone) stays near 1e6: a full-rank factorisation still gives back W.
ASVD_FLOOR = 1e-6


def asvd_factors(weight: torch.Tensor, abs_mean: torch.Tensor, rank: int, alpha: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, r), A (r, in) from the activation-scaled SVD of ASVD (Yuan et al. 2023).

    With S = diag(s)^alpha, s_j the mean |x_j| of input channel j over the calibration tokens: the SVD
    W S = U Sigma V^T is truncated to rank r and the scaling undone on the right factor,
    B = U_r Sigma_r^1/2, A = Sigma_r^1/2 V_r^T S^-1, so B A = W at full rank. Why scale: columns that meet large
    activations weigh more in the truncation (a cheap diagonal stand-in for SVD-LLM's whitening, with no
    optimality guarantee). sqrt(sigma) goes to each side, as in `surgery.ops.low_rank_factors`.

    Args:
        weight: W, (out, in).
        abs_mean: s, (in,), >= 0.
        rank: r, 1 <= r <= min(out, in).
        alpha: the exponent on s (ASVD's default 0.5).
    """
    scale = abs_mean.detach().to(torch.float64).pow(alpha)  # (in,)
    mean = float(scale.mean())
    scale = scale.clamp_min(ASVD_FLOOR * mean if mean > 0 else 1.0)
    u, sigma, vh = svd64(weight.detach().to(torch.float64) * scale)
    root = sigma[:rank].sqrt()
    b = u[:, :rank] * root  # (out, r)
    a = root[:, None] * vh[:rank] / scale  # (r, in)
    return b.to(weight.dtype), a.to(weight.dtype)
