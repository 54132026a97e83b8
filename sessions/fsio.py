"""Durable file primitives: fsync that reaches the disk, and atomic replace (temp file + fsync + rename).

Everything the sessions package writes goes through `os.open`, so a test can simulate a read-only filesystem by
making `os.open` fail for write flags (tests run as root, where chmod alone does not block writes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

# errors that mean "this place cannot be written", as opposed to a bug or a full disk
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def fsync_fd(fd: int) -> None:
    """Flush a file to stable storage (F_FULLFSYNC on macOS, where plain fsync stops at the drive's cache)."""
    if fcntl is not None and hasattr(fcntl, "F_FULLFSYNC"):  # pragma: no cover - macOS only
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new or renamed file) durable; a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that readers (and a crash) see the old or the new content, never a mix.

    Raises:
        OSError: The directory cannot be written; no temp file is left behind.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fsync_fd(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def is_not_writable(exc: OSError) -> bool:
    """Whether an OSError means the place is read-only or forbidden (not a bug, not a full disk)."""
    return exc.errno in NOT_WRITABLE
