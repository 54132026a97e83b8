"""`workbench plan suggest` (importance scoring issue): in progress."""

from __future__ import annotations


def suggest() -> None:
    """Turn scores into a valid plan for a target size (not yet built)."""
    raise NotImplementedError("workbench plan suggest lands with the importance-scoring issue")
