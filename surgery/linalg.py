"""The thin float64 SVD that `low_rank` (surgery.ops) and its oracle (surgery.mask) share."""

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
