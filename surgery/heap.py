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
import os


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS, Windows: nothing to do)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def resident_bytes() -> int | None:
    """The process's resident size (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Call once per step (after the step freed its temporaries): trims the heap (glibc `malloc_trim`) when the
    resident size grew by more than `slack` bytes over its level at the first step after the last trim.

    Why not every step: each step's freed scratch (hidden-state copies, Gram matrices) is reused by the next step;
    trimmed, it is faulted in again (system time: +13% CPU on the demo's data-step apply when trimmed after every
    layer). Measuring from the level a step reaches with its scratch in place trims only the growth (the holes the
    scratch no longer fits), bounded by `slack`."""

    def __init__(self, slack: int = 64 << 20) -> None:
        self.slack, self.trim, self.base = slack, _malloc_trim(), None

    def __call__(self) -> None:
        now = resident_bytes() if self.trim is not None else None
        if now is None:
            return
        if self.base is None:
            self.base = now
        elif now > self.base + self.slack:
            self.trim(0)
            self.base = None  # the next step's level, with its scratch faulted in again, is the new base


__all__ = ["HeapTrimmer", "resident_bytes"]
