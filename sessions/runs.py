"""Compress runs recorded in a session: the `workbench compress` recipes whose job directory is in the session's
jobs/ (started from the TUI's jobs panel, or by `workbench compress --session NAME`).

A compress job directory is also the recipe's work directory (surgery.compress): job.json (source, budget,
output), prelude.json (the scoring and the suggestion: the plan file, parameters before and after),
pipeline/progress.json (the base model's metrics and each finished stage's metrics after it) and plan.json. They
are read here, defensively: a run in progress shows the stages it finished, a damaged file shows as missing, a
listing never breaks. Nothing here imports torch.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class CompressRun:
    """One compress recipe: its state, what it was asked, its plan and the metrics before and after each stage.

    `metrics` rows are `{"stage", "params", "perplexity"}` (perplexity None without --eval-data), the base model
    first, then each finished stage (prune = the cut with its reconstruction, redistill).
    """

    id: str
    state: str
    source: str | None = None
    target_params: float | None = None
    out: str | None = None
    plan: str | None = None
    plan_ops: dict[str, int] = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """Human-readable summary (what `sessions show` and the TUI's jobs panel print)."""
        head = f"{self.id}: {self.state}, keep {self.target_params} of {self.source} -> {self.out}"
        rows = [head]
        base = self.metrics[0] if self.metrics else None
        for m in self.metrics:
            ppl = m.get("perplexity")
            ratio = (f" ({ppl / base['perplexity']:.2f}x)" if ppl and base and base.get("perplexity") and m is not base
                     else "")
            rows.append(f"  {m['stage']:10s} params {m['params']:,}" + (f"  perplexity {ppl:.4g}{ratio}" if ppl else ""))
        if self.plan:
            ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.plan_ops.items())) or "no steps"
            rows.append(f"  plan       {self.plan} ({ops})")
        return rows


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _row(stage: str, metrics) -> dict | None:
    if not isinstance(metrics, dict) or not isinstance(metrics.get("params"), int):
        return None
    ppl = metrics.get("perplexity")
    return {"stage": stage, "params": metrics["params"], "perplexity": ppl if isinstance(ppl, (int, float)) else None}


def read_compress_run(job_dir: Path, state: str | None = None) -> CompressRun | None:
    """The compress run in job directory `job_dir`, or None when it is not one (another kind of job, unreadable).

    `state`: the job's state where the caller has just computed it (`surgery.jobs.status.job_status`), so that the
    event log is not read and the lock not probed a second time; None computes it here.
    """
    doc = _json(job_dir / "job.json")
    if doc is None or doc.get("kind") != "compress":
        return None
    if state is None:
        from surgery.jobs.status import job_status
        from surgery.jobs.store import JobDir

        try:
            state = job_status(JobDir(job_dir)).state
        except Exception:  # noqa: BLE001 - a listing shows what it can
            state = "unknown"
    run = CompressRun(id=job_dir.name, state=state, source=doc.get("source"), target_params=doc.get("target_params"),
                      out=doc.get("out"))
    prelude = _json(job_dir / "prelude.json") or {}
    plan_path = (prelude.get("suggest") or {}).get("plan")
    plan = _json(Path(plan_path)) if isinstance(plan_path, str) else None
    if plan is not None:
        run.plan = plan_path
        run.plan_ops = dict(Counter(s.get("op", "?") for s in plan.get("steps", []) if isinstance(s, dict)))
    progress = _json(job_dir / "pipeline" / "progress.json") or {}
    rows = [_row("base", progress.get("before"))]
    rows += [_row(s.get("stage", "?"), s.get("after")) for s in progress.get("stages", []) if isinstance(s, dict)]
    run.metrics = [r for r in rows if r is not None]
    return run


def compress_runs(jobs_dir: Path) -> list[CompressRun]:
    """Every compress run under a jobs directory (a session's jobs/), oldest first."""
    try:
        dirs = sorted(p for p in Path(jobs_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    return [run for p in dirs if (run := read_compress_run(p)) is not None]


def session_of_job(job_dir: Path) -> Path | None:
    """The session directory whose jobs/ holds `job_dir`, or None for a job outside any session."""
    from sessions.paths import is_session_dir

    parent = Path(job_dir).parent
    return parent.parent if parent.name == "jobs" and is_session_dir(parent.parent) else None


def keep_scores(job_dir: Path) -> Path | None:
    """Copy a finished compress run's score file into its session's scores/ (atomically), where the TUI picks up
    the newest one for these weights on open; returns the copy (None outside a session or without scores)."""
    from sessions.fsio import atomic_write_bytes

    session = session_of_job(job_dir)
    scores = Path(job_dir) / "scores.safetensors"
    if session is None or not scores.is_file():
        return None
    target = session / "scores" / f"{Path(job_dir).name}.safetensors"
    atomic_write_bytes(target, scores.read_bytes())
    return target
