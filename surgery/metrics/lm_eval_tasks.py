"""Optional EleutherAI lm-evaluation-harness tasks, run through its Python API on the in-memory model.

Only when the `lm_eval` package is importable (`pip install lm-eval`); otherwise `require_lm_eval` raises a
UserError that says so, before any work starts. The model is wrapped in `lm_eval.models.huggingface.HFLM`
(which accepts a loaded `PreTrainedModel`), so surgery-only checkpoints work too. Task data comes through the
`datasets` library, so the Hugging Face Hub (or its local cache) must be reachable.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from surgery.errors import UserError


@dataclass(frozen=True)
class TaskScore:
    """One metric of one task: "hellaswag" / "acc_norm" = 0.41 +- 0.005 (stderr)."""

    task: str
    metric: str
    value: float
    stderr: float | None


def lm_eval_available() -> bool:
    """Whether the lm_eval package can be imported."""
    return importlib.util.find_spec("lm_eval") is not None


def parse_tasks(spec: str | list[str] | None) -> list[str]:
    """"hellaswag,arc_easy" (or a list) -> ["hellaswag", "arc_easy"], blanks dropped, order kept, no repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    return list(dict.fromkeys(t.strip() for t in items if t and t.strip()))


def require_lm_eval() -> None:
    """Raise a UserError with the install command when lm_eval is missing."""
    if not lm_eval_available():
        raise UserError("--lm-eval needs the lm-eval package, which is not installed: pip install lm-eval")


def scores_from_results(results: dict) -> list[TaskScore]:
    """Flatten lm_eval's `results["results"]` ({task: {"acc,none": x, "acc_stderr,none": s, ...}})."""
    scores = []
    for task, metrics in sorted((results.get("results") or {}).items()):
        for key, value in sorted(metrics.items()):
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # "alias" and friends
            name, filt = key.split(",", 1)
            if name.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}")
            label = name if filt == "none" else f"{name} ({filt})"
            scores.append(TaskScore(task, label, float(value),
                                    float(stderr) if isinstance(stderr, (int, float)) else None))
    return scores


def run_tasks(model, tokenizer, tasks: list[str], *, batch_size: int = 1, limit: int | None = None,
              num_fewshot: int | None = None) -> list[TaskScore]:
    """Run lm-eval tasks on an in-memory model.

    Args:
        model: A transformers causal LM in eval mode.
        tokenizer: Its tokenizer.
        tasks: lm-eval task names ("hellaswag", "arc_easy", ...).
        batch_size: lm-eval's batch size.
        limit: Examples per task (None: all).
        num_fewshot: Few-shot examples (None: the task's default).

    Raises:
        UserError: lm_eval missing, no tokenizer, no tasks, or lm_eval refused the tasks (unknown name, data
            unavailable offline).
    """
    require_lm_eval()
    if tokenizer is None:
        raise UserError("the model has no tokenizer files: cannot run lm-eval tasks")
    if not tasks:
        raise UserError("--lm-eval names no tasks (e.g. --lm-eval hellaswag,arc_easy)")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                          log_samples=False)
    except (KeyError, ValueError, OSError, ConnectionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"lm-eval could not run {', '.join(tasks)} ({first})") from None
    if not results:
        raise UserError(f"lm-eval returned no results for {', '.join(tasks)}")
    return scores_from_results(results)
