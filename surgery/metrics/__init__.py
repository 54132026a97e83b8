"""Before/after metrics: size, perplexity, agreement with a teacher, speed, generation samples, lm-eval tasks, and
recommendation metrics (HR/NDCG/MRR) of rec model directories.

Each metric is a plain function on an in-memory model (so distillation jobs and the TUI can call them directly);
`runner` strings them together for `workbench eval` / `workbench compare` and keeps their results as versioned
JSON records (`records`) that later runs reuse; `table` lays records of several models out side by side.

    from surgery.metrics import EvalSettings, RecordStore, compare_sources, build_comparison
    evals = compare_sources(["smollm2-135m", "./pruned"], EvalSettings(data="wiki.test.raw", max_tokens=8192))
    print(build_comparison(evals).to_markdown())

Names are imported lazily, so importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Cancelled": "surgery.metrics.common",
    "ProgressEvent": "surgery.metrics.common",
    "model_size": "surgery.metrics.size",
    "SizeResult": "surgery.metrics.size",
    "perplexity": "surgery.metrics.perplexity",
    "PerplexityResult": "surgery.metrics.perplexity",
    "plan_windows": "surgery.metrics.perplexity",
    "agreement": "surgery.metrics.agreement",
    "AgreementResult": "surgery.metrics.agreement",
    "TeacherMismatch": "surgery.metrics.agreement",
    "check_compatible": "surgery.metrics.agreement",
    "measure_speed": "surgery.metrics.speed",
    "SpeedResult": "surgery.metrics.speed",
    "generate_samples": "surgery.metrics.generation",
    "DEFAULT_PROMPTS": "surgery.metrics.generation",
    "run_tasks": "surgery.metrics.lm_eval_tasks",
    "lm_eval_available": "surgery.metrics.lm_eval_tasks",
    "EvalRecord": "surgery.metrics.records",
    "Metric": "surgery.metrics.records",
    "RecordStore": "surgery.metrics.records",
    "record_key": "surgery.metrics.records",
    "default_records_dir": "surgery.metrics.records",
    "EvalSettings": "surgery.metrics.runner",
    "ModelEval": "surgery.metrics.runner",
    "Teacher": "surgery.metrics.runner",
    "evaluate_source": "surgery.metrics.runner",
    "compare_sources": "surgery.metrics.runner",
    "RecDataRef": "surgery.metrics.records",
    "evaluate_rec_model": "surgery.metrics.rec",
    "RecEvalResult": "surgery.metrics.rec",
    "Comparison": "surgery.metrics.table",
    "build_comparison": "surgery.metrics.table",
    "format_value": "surgery.metrics.table",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'surgery.metrics' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
