"""Start, cancel and resume jobs. A started job is a separate OS process in its own session and process group.

`start_job` takes the job's lock, spawns `python -m surgery.jobs run JOBDIR` (or the same under
`torch.distributed.run` for several processes) with `start_new_session=True`, stdin from /dev/null and
stdout/stderr appended to files in the job directory, and hands the locked file descriptor to the child: the lock
moves to the child atomically, so between "resume" and "the job runs" there is no moment in which a second resume
could start a second process. Closing the terminal, the TUI or the SSH connection does not reach the job.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from surgery.errors import UserError
from surgery.jobs.events import EventLog, read_events
from surgery.jobs.status import job_status
from surgery.processes import process_start_time
from surgery.jobs.store import JobDir

try:
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LOCK_FD_ENV = "WORKBENCH_JOB_LOCK_FD"  # set for a child whose launcher already holds the job lock


class JobRunning(UserError):
    """The job already has a live process."""


def acquire_lock(job: JobDir, *, attempts: int = 10) -> int | None:
    """Take the job's exclusive lock; returns the open fd (None where flock is unavailable).

    Retries briefly, because a status probe holds the lock for a few microseconds.

    Raises:
        JobRunning: A live process of this job holds it.
    """
    if fcntl is None:
        return None
    fd = os.open(job.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    for i in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if i + 1 < attempts:
                time.sleep(0.05)
    os.close(fd)
    proc = job.read_process() or {}
    raise JobRunning(f"job {job.id} is already running (pid {proc.get('pid', '?')}): wait for it to finish or "
                     f"cancel it with `workbench jobs cancel {job.id}`")


def write_process_record(job: JobDir, pid: int, **extra) -> None:
    """process.json: which process runs the current attempt (pid + its start time, against pid reuse)."""
    from surgery.plan import write_text_atomic

    record = {"pid": pid, "start_time": process_start_time(pid), "host": socket.gethostname(),
              "started": round(time.time(), 3), **extra}
    write_text_atomic(job.process_file, json.dumps(record, indent=2, sort_keys=True) + "\n")


def job_command(job: JobDir, nproc: int = 1) -> list[str]:
    """The command line that runs a job: the module entry point, under torch.distributed.run when nproc > 1."""
    run = ["-m", "surgery.jobs", "run", str(job.path)]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *run]
    return [sys.executable, *run]


def check_launch(job: JobDir, nproc: int) -> None:
    """Refuse, before anything is written, a process count that cannot split the job's batch or that differs from
    the one its newest checkpoint was written with.

    Raises:
        UserError: Either mismatch (one line saying what to run instead).
    """
    from surgery.distill.config import load_config
    from surgery.distill.world import check_resume_world_size, check_world_size
    from surgery.jobs.checkpoint import latest_state

    cfg = load_config(job.job_file)
    check_world_size(cfg.batch_size, cfg.grad_accum, nproc)
    state = latest_state(job.checkpoints_dir)
    if state is not None:
        check_resume_world_size(int(state.get("world_size", 1)), nproc, bool(state.get("sharded")))


def check_runnable(job: JobDir) -> str:
    """Refuse to (re)start a job that runs or is done; returns its state. Both the detached and the foreground
    paths call it, before anything changes.

    Raises:
        JobRunning: The job has a live process.
        UserError: The job is done.
    """
    state = job_status(job).state
    if state in ("running", "cancelling"):
        pid = (job.read_process() or {}).get("pid", "?")
        raise JobRunning(f"job {job.id} is already running (pid {pid}): wait for it to finish or cancel it with "
                         f"`workbench jobs cancel {job.id}`")
    if state == "done":
        raise UserError(f"job {job.id} is done: nothing to resume (its model is in {job_status(job).output})")
    return state


def start_job(job: JobDir, *, nproc: int = 1, resume: bool = False) -> subprocess.Popen:
    """Spawn the job's detached process (first start or resume); returns the Popen handle.

    Raises:
        JobRunning: The job already has a live process (nothing is started, nothing changes).
        UserError: The job is done (nothing to resume) or nproc < 1.
    """
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1 (got {nproc})")
    if check_runnable(job) == "created":
        resume = False
    check_launch(job, nproc)
    return launch_process(job, job_command(job, nproc), nproc=nproc, resume=resume)


def launch_process(job: JobDir, cmd: list[str], *, nproc: int = 1, resume: bool = False,
                   numbered: bool = True) -> subprocess.Popen:
    """Spawn `cmd` as the job's detached process and record it; returns the Popen handle. The one launcher of
    `start_job`, the compress job's `spawn` and the rec job's `start_rec_job`.

    Takes the job lock and hands the locked descriptor to the child (the job reads "running" from the first
    moment, and no second process can start in between), drops an old cancel request, writes process.json and a
    "launch" event. `numbered`: the attempt is 1 + the launches so far (None for a rec job, which does not count
    them).

    Raises:
        JobRunning: A live process of the job holds the lock (nothing is started, nothing changes).
    """
    fd = acquire_lock(job)
    try:
        attempt = None
        if numbered:
            events, _ = read_events(job.events_file)
            attempt = 1 + sum(1 for e in events if e["event"] == "launch")
        job.cancel_file.unlink(missing_ok=True)  # an old request must not cancel the new attempt
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if fd is not None:
            env[LOCK_FD_ENV] = str(fd)
        with open(job.stdout_file, "ab") as out, open(job.stderr_file, "ab") as err:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                pass_fds=(fd,) if fd is not None else (), cwd=job.path, env=env,
            )
        write_process_record(job, proc.pid, command=cmd, attempt=attempt, nproc=nproc)
        EventLog(job.events_file).append("launch", pid=proc.pid, attempt=attempt, nproc=nproc, resume=resume)
    finally:
        if fd is not None:
            os.close(fd)  # the child holds its own copy of the locked file description
    return proc


def request_cancel(job: JobDir) -> str:
    """Ask a running job to stop at its next step boundary (it checkpoints first); returns what happened.

    Raises:
        UserError: The job is not running (finished, lost, never started).
    """
    from surgery.plan import write_text_atomic

    status = job_status(job)
    if status.state == "created":
        EventLog(job.events_file).append("cancelled", sync=True, step=0, checkpoint=None)
        return "cancelled before it started"
    if status.state in ("done", "failed", "cancelled"):
        raise UserError(f"job {job.id} is not running (it is {status.state})")
    if status.state == "lost":
        raise UserError(f"job {job.id} is lost (its process vanished at step {status.step}): nothing to cancel; "
                        f"`workbench jobs resume {job.id}` continues it from its last checkpoint")
    write_text_atomic(job.cancel_file, json.dumps({"requested": round(time.time(), 3)}) + "\n")
    return "cancel requested: the job stops after its current step"


def request_checkpoint(job: JobDir) -> str:
    """Ask a running job to write a checkpoint after its current step.

    Raises:
        UserError: The job is not running.
    """
    from surgery.plan import write_text_atomic

    state = job_status(job).state
    if state != "running":
        raise UserError(f"job {job.id} is not running (it is {state}): nothing to checkpoint")
    write_text_atomic(job.checkpoint_request_file, json.dumps({"requested": round(time.time(), 3)}) + "\n")
    return "checkpoint requested: it is written after the current step"


def wait_for(job: JobDir, timeout: float, *, poll: float = 0.2) -> str:
    """Wait until the job is no longer running (or `timeout` seconds pass); returns its state."""
    deadline = time.monotonic() + timeout
    while True:
        state = job_status(job).state
        if state not in ("running", "cancelling", "created") or time.monotonic() > deadline:
            return state
        time.sleep(poll)


def stderr_tail(job: JobDir, lines: int = 5) -> list[str]:
    """The last lines of the job's stderr.log (for `jobs show` of a lost or failed job)."""
    try:
        text = Path(job.stderr_file).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]
