"""`workbench score` (importance scoring issue): in progress."""

from __future__ import annotations


def score() -> None:
    """Score heads, KV groups, neurons, layers and singular values on calibration text (not yet built)."""
    raise NotImplementedError("workbench score lands with the importance-scoring issue")
