"""`workbench eval` (metrics issue): in progress."""

from __future__ import annotations


def evaluate() -> None:
    """Evaluate one model (not yet built)."""
    raise NotImplementedError("workbench eval lands with the metrics issue")
