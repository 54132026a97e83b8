"""Operations on the set of sessions under a root: list them, remove one.

`remove_session` never touches anything outside the session directory: the directory is first renamed to a hidden
name inside the root (so a half-removed session never lists), then deleted without following symbolic links (a
link inside the session to a model elsewhere is removed, its target is not).
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from sessions.contents import list_contents
from sessions.lock import LockInfo, pid_alive, read_lock
from sessions.paths import LOCK_FILE, check_name, is_session_dir, list_names, sessions_root, unknown_session
from sessions.session import Session
from surgery.errors import UserError


@dataclass
class SessionInfo:
    """One row of `workbench sessions list`."""

    name: str
    source: str | None = None
    updated: float | None = None
    marks: int = 0
    running_jobs: int = 0
    locked_by: str | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def live_holder(path: Path) -> LockInfo | None:
    """The live process holding session directory `path` (on this host), or None."""
    import socket

    info = read_lock(path / LOCK_FILE)
    if not isinstance(info, LockInfo):
        return None
    if info.host != socket.gethostname() or pid_alive(info.pid, info.started):
        return info
    return None


def list_sessions(root: Path | None = None) -> list[SessionInfo]:
    """Every session under `root`, opened read-only (no lock taken, nothing written); unreadable ones say why."""
    root = Path(root) if root is not None else sessions_root()
    rows = []
    for name in list_names(root):
        holder = live_holder(root / name)
        row = SessionInfo(name, locked_by=holder.describe() if holder else None)
        try:
            s = Session.open(name, root=root, readonly=True)
        except UserError as exc:
            row.error = str(exc)
        else:
            row.source, row.updated, row.marks = s.model.source, s.updated, s.mark_count
            row.running_jobs = list_contents(s.path).running_jobs
        rows.append(row)
    return rows


def remove_session(name: str, root: Path | None = None, *, force: bool = False) -> Path:
    """Delete session `name` and everything inside its directory.

    Args:
        name: Session name.
        root: Sessions directory.
        force: Remove even when another live process holds the session or jobs are running.

    Returns:
        The path that was removed.

    Raises:
        UnknownSession, UserError: No such session, held by a live process, running jobs, or not removable.
    """
    root = Path(root) if root is not None else sessions_root()
    path = root / check_name(name)
    if not path.is_symlink() and not is_session_dir(path):
        raise unknown_session(name, root)
    if not force and not path.is_symlink():
        holder = live_holder(path)
        if holder is not None:
            raise UserError(f"session {name!r} is open in another process ({holder.describe()}): close it first, "
                            "or pass --force")
        running = list_contents(path).running_jobs
        if running:
            raise UserError(f"session {name!r} has {running} running job(s): cancel them first, or pass --force")
    trash = root / f".removing-{name}-{secrets.token_hex(4)}"
    try:
        os.rename(path, trash)
    except OSError as exc:
        raise UserError(f"cannot remove session {name!r}: {exc.strerror or exc}") from None
    if trash.is_symlink():  # the session entry itself was a link: remove the link, never what it points to
        trash.unlink()
    else:
        shutil.rmtree(trash)
    return path
