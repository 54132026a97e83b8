"""Hand the C heap's free pages back to the OS between the steps of a long layer-by-layer loop.

Why: glibc raises its mmap threshold (up to 32 MB) each time a large mmapped block is freed, so after the first
layer the per-layer float64 Gram matrices, hidden-state copies and cut weights (MBs each) come from the heap
instead of fresh mappings. Freed, they stay in the heap as holes the next layer's sizes do not quite fit, and the
resident size climbs layer after layer although no tensor survives (measured on the demo's streaming data-step
apply: +230 MB over 30 layers, flat with a `malloc_trim` per layer; docs/benchmarks.md, "Data steps layer by
layer"). `malloc_trim(0)` returns those free pages; it frees nothing that is in use and changes no value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS, Windows: nothing to do)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Return the heap's free pages to the OS (glibc only; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


__all__ = ["release_free_heap"]
