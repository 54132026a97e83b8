"""`workbench compare` (metrics issue): in progress."""

from __future__ import annotations


def compare() -> None:
    """Compare models side by side (not yet built)."""
    raise NotImplementedError("workbench compare lands with the metrics issue")
