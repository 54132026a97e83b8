"""What a session directory holds besides its plan: score files, job directories, evaluation records, exports.

Other parts of the workbench write these (scoring, jobs, evaluation); here they are only listed, and defensively:
a job.json that is missing, half written or of an unknown shape never breaks a listing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sessions.lock import pid_alive
from sessions.runs import CompressRun, compress_runs


@dataclass
class JobInfo:
    """One folder under jobs/: its id and the status its job.json reports ("unknown" when unreadable)."""

    id: str
    status: str


@dataclass
class SessionContents:
    """Relative names of what lives in scores/, jobs/, evals/ and exports/."""

    scores: list[str] = field(default_factory=list)
    jobs: list[JobInfo] = field(default_factory=list)
    evals: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)
    compress: list[CompressRun] = field(default_factory=list)  # the compress recipes among the jobs

    @property
    def running_jobs(self) -> int:
        return sum(j.status == "running" for j in self.jobs)

    def to_dict(self) -> dict:
        return asdict(self)


def job_status(job_dir: Path) -> str:
    """The status of a job directory from its job.json ("status" or "state"), read defensively.

    A job that says "running" but records a pid on this host that no longer runs is reported as "dead". A
    workbench job (surgery.jobs: no status in its job.json, an event log beside it) reads its state from the log
    and its lock: created, running, cancelling, done, failed, cancelled or lost.
    """
    try:
        data = json.loads((job_dir / "job.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return "unknown"
    if not isinstance(data, dict):
        return "unknown"
    status = data.get("status", data.get("state"))
    if status is None and (job_dir / "checkpoints").is_dir():  # made by surgery.jobs.store.create_job
        from surgery.jobs.status import job_status as workbench_job_status
        from surgery.jobs.store import JobDir

        try:
            return workbench_job_status(JobDir(job_dir)).state
        except Exception:  # noqa: BLE001 - a listing never breaks on one job
            return "unknown"
    if not isinstance(status, str) or not status:
        return "unknown"
    pid = data.get("pid")
    if status == "running" and isinstance(pid, int) and not isinstance(pid, bool):
        import socket

        host = data.get("host")
        if (host is None or host == socket.gethostname()) and not pid_alive(pid):
            return "dead"
    return status


def _entries(directory: Path, *, dirs: bool | None = None) -> list[Path]:
    try:
        found = [p for p in directory.iterdir() if not p.name.startswith(".")]
    except OSError:
        return []
    if dirs is not None:
        found = [p for p in found if p.is_dir() == dirs]
    return sorted(found)


def list_contents(session_path: Path) -> SessionContents:
    """List the session's scores/, jobs/, evals/ and exports/ (missing folders read as empty)."""
    scores = sorted(str(p.relative_to(session_path / "scores"))
                    for p in (session_path / "scores").rglob("*") if p.is_file() and not p.name.startswith("."))
    jobs = [JobInfo(p.name, job_status(p)) for p in _entries(session_path / "jobs", dirs=True)]
    evals = [p.name for p in _entries(session_path / "evals", dirs=False)]
    exports = [p.name for p in _entries(session_path / "exports")]
    return SessionContents(scores, jobs, evals, exports, compress_runs(session_path / "jobs"))
