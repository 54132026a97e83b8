"""Is a recorded process still the one that wrote the record? Shared by jobs (surgery.jobs) and session locks.

A pid alone is not enough: the process may be a zombie (exited, not yet reaped) or the pid may have been reused
by a newer process, told apart by its start time (field 22 of /proc/PID/stat, clock ticks since boot).
"""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after "pid (comm) " (state is [0], start time [19]); None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()  # comm may hold spaces and parentheses: split after the last ")"


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether `pid` is a live process on this host (not a zombie) and, when `start_time` is given and known, the
    same process that recorded it."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _stat_fields(pid)
    if fields is None:
        return True  # no /proc: trust kill(0)
    if fields and fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    if start_time is None:
        return True
    now = process_start_time(pid)
    return now is None or now == start_time
