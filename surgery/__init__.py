"""surgery: structural pruning, low-rank surgery and plan files for Hugging Face causal LMs (no UI imports).

Quick use::

    import surgery
    report = surgery.inspect("smollm2-135m")            # shapes and counts from headers only
    plan = surgery.load_plan("plan.json")
    model = surgery.load("./pruned")                     # any checkpoint, surgery-only ones included
    model, resolution = surgery.apply_plan(model, plan)  # in place, validated first

Names are imported lazily so that `import surgery` (and `workbench inspect`) does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "apply_plan": "surgery.apply",
    "validate_plan": "surgery.apply",
    "Plan": "surgery.plan",
    "load_plan": "surgery.plan",
    "parse_plan": "surgery.plan",
    "masked": "surgery.mask",
    "save_model_dir": "surgery.export",
    "load_model": "surgery.loading",
    "resolve_source": "surgery.sources",
    "UserError": "surgery.errors",
    "PlanError": "surgery.errors",
    "SourceError": "surgery.errors",
}


def load(source: str, *, dtype: Any = "auto", device: str | None = None, **kwargs: Any):
    """Load any supported model source (HF dir, hub id, .gguf, demo alias, surgery output) and return the model."""
    from surgery.loading import load_model

    return load_model(source, dtype=dtype, device=device, **kwargs).model


def __getattr__(name: str) -> Any:
    if name == "inspect":  # the submodule itself is callable: surgery.inspect(source)
        return importlib.import_module("surgery.inspect")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")


__all__ = ["inspect", "load", *_EXPORTS]
