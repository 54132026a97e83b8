"""surgery.linalg.svd64: exact enough for full-rank round trips, and it leaves torch's thread count as it found it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from surgery.linalg import SINGLE_THREAD_MAX, svd64


def test_svd64_reconstructs_and_restores_the_thread_count():
    before = torch.get_num_threads()
    w = torch.randn(48, 20, generator=torch.Generator().manual_seed(0))
    u, s, vh = svd64(w)
    assert (u.dtype, u.shape, s.shape, vh.shape) == (torch.float64, (48, 20), (20,), (20, 20))
    assert torch.all(s[:-1] >= s[1:])
    assert torch.allclose((u * s) @ vh, w.double(), atol=1e-12)
    assert torch.get_num_threads() == before


def test_concurrent_svds_restore_the_thread_count():
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mats = [torch.randn(64, 32) for _ in range(8)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(svd64, mats))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)


def test_large_matrices_keep_torchs_threads(monkeypatch):
    import surgery.linalg as linalg

    seen = []
    monkeypatch.setattr(linalg.torch.linalg, "svd", lambda a, full_matrices: seen.append(torch.get_num_threads())
                        or (a, a, a))
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        svd64(torch.zeros(SINGLE_THREAD_MAX + 1, 1))
        svd64(torch.zeros(8, 4))
    finally:
        torch.set_num_threads(original)
    assert seen == [2, 1]
