"""One writer per session: a `lock` file naming the owner (pid, host, process start time, a random token).

Acquiring runs under an flock on the session directory, so two processes on this host that race for the same lock
(or for the same stale lock) are serialised: exactly one wins, the other sees its lock and opens read-only. A lock
whose pid is gone on this host (or is a zombie, or is a new process that reused the pid, told apart by its start
time) is stale and taken over. A lock from another host cannot be checked: the second opener gets read-only mode
and a notice that says how to break it. The lock file itself is written atomically (temp + rename), so nobody ever
reads half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from sessions.fsio import atomic_write_bytes
from sessions.paths import LOCK_FILE
from surgery.processes import pid_alive, process_start_time

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the flock guard degrades to a no-op
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class LockInfo:
    """Who holds a session."""

    pid: int
    host: str
    started: int | None  # process start time in clock ticks since boot (Linux), to detect pid reuse
    since: float
    token: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.since))
        return f"pid {self.pid} on {self.host} since {when}"


def read_lock(path: Path) -> LockInfo | None | str:
    """The lock at `path`: LockInfo, None when there is none, or "corrupt"."""
    try:
        data = json.loads(path.read_bytes())
        return LockInfo(int(data["pid"]), str(data["host"]), data.get("started"), float(data["since"]),
                        str(data["token"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return "corrupt"


@contextlib.contextmanager
def _guard(directory: Path) -> Iterator[None]:
    """An exclusive flock on the session directory for the few milliseconds of a check-and-write."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


@dataclass
class LockResult:
    """The outcome of `acquire`: `owned` True means this process may write."""

    owned: bool
    notice: str | None = None  # one line for the user when not owned, or when a stale lock was taken over
    holder: LockInfo | None = None


class SessionLock:
    """The lock of one session directory, held by this object once `acquire` says so."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / LOCK_FILE
        self.mine: LockInfo | None = None

    def acquire(self) -> LockResult:
        """Take the lock if it is free or stale; otherwise report who holds it (the caller opens read-only).

        Raises:
            OSError: The lock cannot be written for a reason other than a read-only or forbidden place.
        """
        host = socket.gethostname()
        with _guard(self.directory):
            current = read_lock(self.path)
            notice = None
            if isinstance(current, LockInfo):
                if current.host != host:
                    return LockResult(False, (
                        f"session is locked by {current.describe()}: opened read-only (if that process is gone, "
                        f"delete {self.path})"), current)
                if pid_alive(current.pid, current.started):
                    return LockResult(False, (
                        f"session is open in another process ({current.describe()}): opened read-only"), current)
                notice = f"took over a stale lock left by {current.describe()} (no longer running)"
            elif current == "corrupt":
                notice = f"replaced an unreadable lock file {self.path}"
            mine = LockInfo(os.getpid(), host, process_start_time(os.getpid()), time.time(), secrets.token_hex(8))
            atomic_write_bytes(self.path, (json.dumps(asdict(mine), sort_keys=True) + "\n").encode())
            self.mine = mine
            return LockResult(True, notice, mine)

    def release(self) -> None:
        """Remove the lock file if it is still ours (never someone else's)."""
        if self.mine is None:
            return
        with _guard(self.directory):
            current = read_lock(self.path)
            if isinstance(current, LockInfo) and current.token == self.mine.token:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        self.mine = None

    def still_mine(self) -> bool:
        """Whether the lock file still names this holder (someone may have broken it by hand)."""
        current = read_lock(self.path)
        return self.mine is not None and isinstance(current, LockInfo) and current.token == self.mine.token
