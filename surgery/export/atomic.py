"""Atomic output directories: every directory writer (HF models, exports, rec models and data) goes through here.

A directory appears only when complete: it is filled in a hidden temporary sibling that is renamed at the end, so
Ctrl-C, kill -9 or a full disk leave no half-written output and never damage an existing one. An existing output
is swapped with the new one in one step (Linux `renameat2(RENAME_EXCHANGE)`), so a kill at any moment leaves the
old or the new output in place; where that call is missing, the old output is moved aside first and the next
writer puts it back if the process died between the two renames. Writers of one output take a lock on it, so two
runs never both report success for the same directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from surgery.errors import UserError
from surgery.filemode import make_ordinary

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]

_NAME_MAX = 255  # bytes in one path component on every file system we write to
_TAG_ROOM = 32  # longest tag after the hidden prefix: "tmp-<pid>-<8 hex>", "old-<8 hex>", "lock"


def _hidden_prefix(out: Path) -> str:
    """`.NAME.` for the hidden siblings of `out`; a NAME too long to leave room for a tag is cut and hashed, so a
    legal 240-byte output name still gets legal sibling names."""
    name = out.name
    if len(name.encode()) + 2 + _TAG_ROOM <= _NAME_MAX:
        return f".{name}."
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    keep = name.encode()[: _NAME_MAX - _TAG_ROOM - len(digest) - 3].decode("utf-8", errors="ignore")
    return f".{keep}~{digest}."


def _normalise(out: str | Path) -> Path:
    """`out` as an absolute path with `.` and `..` folded (so `--out .` has a name and a parent)."""
    return Path(os.path.abspath(Path(out).expanduser()))


def refuse_replacing(out: str | Path, protected: str | Path, what: str) -> None:
    """Refuse an output that is `protected` or a directory above it (replacing it would delete `protected`).

    Raises:
        UserError: It is.
    """
    out, protected = Path(os.path.realpath(out)), Path(os.path.realpath(protected))
    if protected == out or protected.is_relative_to(out):
        raise UserError(f"refusing to write the output to {out}: it would replace {what} {protected}")


def check_output_dir(out: Path, overwrite: bool = False) -> None:
    """Fail early (before any heavy work) when `out` cannot be written or would clobber something."""
    out = Path(out)
    if out.is_symlink():  # replacing it would replace the link, and leave the directory it named behind
        raise UserError(f"output path is a symbolic link: {out} (give the directory it points to instead)")
    absolute = _normalise(out)
    if absolute.parent == absolute:
        raise UserError(f"cannot write the output to the root directory {absolute}")
    refuse_replacing(absolute, os.getcwd(), "the current directory")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output path exists and is not a directory: {out}")
        if any(out.iterdir()) and not overwrite:
            raise UserError(f"output directory exists and is not empty: {out} (pass --overwrite to replace it)")
    check_parent_writable(out)


def check_parent_writable(out: Path) -> None:
    """`out` can be created: its nearest existing ancestor is a directory this process may write into."""
    parent = _normalise(out).parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create {out}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent}: permission denied")


def _tmp_sibling(out: Path) -> Path:
    return out.parent / f"{_hidden_prefix(out)}tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_stale_tmp(out: Path) -> None:
    """Remove temp siblings left by a killed earlier run (their pid is gone)."""
    for p in out.parent.glob(f"{glob.escape(_hidden_prefix(out))}tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def recover_output(out: str | Path) -> None:
    """Finish what a killed writer of `out` left: an old output moved aside (`.NAME.old-*`) goes back into place
    when `out` is missing (the process died between the two renames), and is deleted when `out` is there (it died
    while deleting the old copy). Call it holding the output's lock."""
    out = _normalise(out)
    for aside in sorted(out.parent.glob(f"{glob.escape(_hidden_prefix(out))}old-*")):
        if not aside.is_dir() or aside.is_symlink():
            aside.unlink(missing_ok=True)
        elif not out.exists() and not out.is_symlink():
            os.replace(aside, out)
        else:
            shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold the writer's lock of `out` (a hidden `.NAME.lock` sibling, flock'ed) for the block.

    Raises:
        UserError: Another process holds it (is writing `out` now).
    """
    out = _normalise(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{_hidden_prefix(out)}lock"
    busy = UserError(f"another process is writing {out} now: wait for it or choose another --out")
    with open(path, "a+") as f:
        if fcntl is None:  # pragma: no cover
            yield
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        try:  # the holder unlinks the file when done: a lock on an unlinked file locks nothing
            if os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:
                raise busy
        except FileNotFoundError:
            raise busy from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still locked here, so no other writer holds this inode


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden sibling of `out` to fill; on success it replaces `out` (an old `out` is swapped out
    and deleted only after the swap), on any error it is removed and `out` is untouched.

    Raises:
        UserError: `out` is a file, a symbolic link, the current directory or one above it, a non-empty directory
            without `overwrite`, or another process is writing it.
    """
    check_output_dir(out, overwrite)
    out = _normalise(out)
    with output_lock(out):
        recover_output(out)
        _remove_stale_tmp(out)
        check_output_dir(out, overwrite)  # again under the lock: another run may have finished it meanwhile
        tmp = _tmp_sibling(out)
        try:
            tmp.mkdir()
            yield tmp
            make_ordinary(tmp)  # the user's umask, not the 0600 some writers (safetensors) leave
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _fsync_dir(path: Path) -> None:
    """fsync every finished file of `path` (hidden temp files being written beside it are skipped)."""
    for f in path.iterdir():
        if f.name.startswith("."):
            continue
        try:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        except (FileNotFoundError, IsADirectoryError):
            continue


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directories `a` and `b` in one step (Linux renameat2); False where the call is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel, or a file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Put `tmp` in the place of `out`; an existing `out` is swapped with it in one step (else moved aside first,
    see `recover_output`) and deleted only after the swap."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):  # `tmp` now holds the old output; a kill from here on leaves the new one in place
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = out.parent / f"{_hidden_prefix(out)}old-{uuid.uuid4().hex[:8]}"
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)

def check_output_file(out: Path, overwrite: bool = False) -> None:
    """Fail early (before any heavy work) when the single file `out` cannot be written or would clobber something."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"output path is a directory, not a file: {out}")
    if out.exists() and not overwrite:
        raise UserError(f"output file exists: {out} (pass --overwrite to replace it)")
    check_parent_writable(out)


@contextlib.contextmanager
def atomic_file(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path beside `out` to write; on success it is fsynced and renamed onto `out`
    (os.replace: readers see the old file or the new one, never a torn one), on any error it is removed.

    Raises:
        UserError: `out` is a directory, or exists without `overwrite`, or cannot be written.
    """
    out = Path(out)
    check_output_file(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
