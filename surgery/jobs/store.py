"""Where jobs live on disk: the jobs root, job ids, the paths inside a job directory, lookup by id prefix."""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import UserError

JOBS_ENV = "WORKBENCH_JOBS"


def jobs_root(override: str | Path | None = None) -> Path:
    """The jobs root: `override`, else $WORKBENCH_JOBS, else `<user data dir "workbench">/jobs` (created)."""
    if override is not None:
        root = Path(override)
    elif os.environ.get(JOBS_ENV):
        root = Path(os.environ[JOBS_ENV])
    else:
        import platformdirs

        root = Path(platformdirs.user_data_dir("workbench")) / "jobs"
    root = root.expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the jobs directory {root}: {exc.strerror}") from None
    return root


@dataclass(frozen=True)
class JobDir:
    """Paths of one job directory (see the `surgery.jobs` docstring for the layout)."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    job_file = property(lambda self: self.path / "job.json")
    events_file = property(lambda self: self.path / "events.jsonl")
    process_file = property(lambda self: self.path / "process.json")
    heartbeat_file = property(lambda self: self.path / "heartbeat")
    lock_file = property(lambda self: self.path / "lock")
    cancel_file = property(lambda self: self.path / "cancel")
    checkpoint_request_file = property(lambda self: self.path / "checkpoint-request")
    stdout_file = property(lambda self: self.path / "stdout.log")
    stderr_file = property(lambda self: self.path / "stderr.log")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    default_output = property(lambda self: self.path / "output")

    def read_config(self) -> dict:
        """job.json as a dict.

        Raises:
            UserError: It is missing, unreadable, not JSON (a torn or binary file) or not a JSON object.
        """
        from surgery.jsonfile import read_json_file

        data = read_json_file(self.job_file, "job")
        if not isinstance(data, dict):
            raise UserError(f"corrupt job file {self.job_file}: expected a JSON object, got {type(data).__name__}")
        return data

    def read_process(self) -> dict | None:
        """process.json, or None when no attempt has started (or the file is being replaced)."""
        try:
            data = json.loads(self.process_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def new_job_id(kind: str = "distill") -> str:
    """`<kind>-YYYYmmdd-HHMMSS-<4 hex>`: sorts by creation time, unique without coordination."""
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def create_job(root: Path, job_json: str, kind: str = "distill") -> JobDir:
    """Make a new job directory under `root` holding `job_json` as job.json (written atomically)."""
    from surgery.plan import write_text_atomic

    for _ in range(20):
        path = Path(root) / new_job_id(kind)
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        job = JobDir(path)
        write_text_atomic(job.job_file, job_json)
        job.checkpoints_dir.mkdir()
        return job
    raise UserError(f"could not create a new job directory under {root}")  # pragma: no cover


def list_jobs(root: Path) -> list[JobDir]:
    """Every job directory under `root` (those holding a job.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [JobDir(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "job.json").is_file()]


def find_job(root: Path, ident: str) -> JobDir:
    """The job whose id is `ident` or starts with it (or a job directory path).

    Raises:
        UserError: No such job, or a prefix that names several.
    """
    direct = Path(ident).expanduser()
    if (direct / "job.json").is_file():
        return JobDir(direct)
    jobs = list_jobs(root)
    exact = [j for j in jobs if j.id == ident]
    if exact:
        return exact[0]
    matches = [j for j in jobs if j.id.startswith(ident)] or [j for j in jobs if ident in j.id]
    if not matches:
        raise UserError(f"no job {ident!r} in {root} (see `workbench jobs list`)")
    if len(matches) > 1:
        raise UserError(f"{ident!r} matches {len(matches)} jobs ({', '.join(j.id for j in matches[:3])}"
                        f"{', ...' if len(matches) > 3 else ''}): give more of the id")
    return matches[0]
