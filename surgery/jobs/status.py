"""What state a job is in: created, running, cancelling, done, failed, cancelled or lost.

Liveness comes from the job's lock file first: the job process holds an exclusive `flock` on it for its whole life
and the kernel drops it when the process dies however it dies (SIGKILL included), so "lock held" means "a process
of this job is alive" with no pid-reuse ambiguity. Where flock is unavailable, the recorded pid is checked instead
(alive, not a zombie, same start time as recorded). A job with no final event and no live process is `lost`, shown
with its last step: a dead job is never shown as running.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from surgery.errors import UserError
from surgery.jobs.events import last_final, last_step, read_events
from surgery.jobs.store import JobDir
from surgery.processes import pid_alive

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

STATES = ("created", "running", "cancelling", "done", "failed", "cancelled", "lost")


def lock_held(job: JobDir) -> bool | None:
    """True when a live process holds the job's lock, False when not, None where flock is unavailable."""
    if fcntl is None:
        return None
    try:
        fd = os.open(job.lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def job_alive(job: JobDir) -> bool:
    """Whether a process of this job is alive (see the module docstring)."""
    held = lock_held(job)
    if held is not None:
        return held
    proc = job.read_process()
    return bool(proc) and pid_alive(int(proc["pid"]), proc.get("start_time"))


@dataclass
class JobStatus:
    """A job's state and latest numbers, for `workbench jobs list/show` and the TUI."""

    id: str
    path: str
    state: str
    step: int
    steps: int | None
    pid: int | None = None
    heartbeat_age_s: float | None = None
    losses: dict = field(default_factory=dict)
    tokens_per_s: float | None = None
    eta_s: float | None = None
    eval: dict | None = None
    error: str | None = None
    output: str | None = None
    checkpoint: str | None = None
    created: float | None = None
    updated: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def job_status(job: JobDir, events: list[dict] | None = None) -> JobStatus:
    """The state of `job` from its event log, lock and process record."""
    from surgery.jobs.checkpoint import list_checkpoints

    if events is None:
        events, _ = read_events(job.events_file)
    final = last_final(events)
    alive = job_alive(job)
    proc = job.read_process()
    if final is not None:
        state = final["event"]
    elif alive:
        state = "cancelling" if job.cancel_file.exists() else "running"
    elif proc is None and not events:
        state = "created"
    else:
        state = "lost"
    try:
        steps = job.read_config().get("steps")
    except UserError:  # a corrupt job.json: the status still shows; `jobs show` and `resume` say what is wrong
        steps = None
    last = next((e for e in reversed(events) if e["event"] == "step"), {})
    evals = [e for e in events if e["event"] == "eval"]
    try:
        heartbeat = time.time() - job.heartbeat_file.stat().st_mtime
    except OSError:
        heartbeat = None
    checkpoints = list_checkpoints(job.checkpoints_dir)
    return JobStatus(
        id=job.id, path=str(job.path), state=state, step=last_step(events), steps=steps,
        pid=(proc or {}).get("pid"), heartbeat_age_s=None if heartbeat is None else round(heartbeat, 1),
        losses=last.get("losses", {}), tokens_per_s=last.get("tokens_per_s"),
        eta_s=last.get("eta_s") if state in ("running", "cancelling") else None,
        eval={k: v for k, v in evals[-1].items() if k not in ("event", "time")} if evals else None,
        error=final.get("error") if final and final["event"] == "failed" else None,
        output=final.get("output") if final and final["event"] == "done" else None,
        checkpoint=checkpoints[-1].name if checkpoints else None,
        created=job.job_file.stat().st_mtime if job.job_file.exists() else None,
        updated=events[-1]["time"] if events else None,
    )
