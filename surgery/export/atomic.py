"""Atomic output directories: every directory writer (HF models, exports, rec models and data) goes through here.

A directory appears only when complete: it is filled in a hidden temporary sibling that is renamed at the end, so
Ctrl-C, kill -9 or a full disk leave no half-written output and never damage an existing one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from surgery.errors import UserError


def check_output_dir(out: Path, overwrite: bool = False) -> None:
    """Fail early (before any heavy work) when `out` cannot be written or would clobber something."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output path exists and is not a directory: {out}")
        if any(out.iterdir()) and not overwrite:
            raise UserError(f"output directory exists and is not empty: {out} (pass --overwrite to replace it)")
    parent = out.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create {out}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent}: permission denied")


def _tmp_sibling(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_stale_tmp(out: Path) -> None:
    """Remove temp siblings left by a killed earlier run (their pid is gone)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden sibling of `out` to fill; on success it replaces `out` (an old `out` is moved aside
    and deleted only after the swap), on any error it is removed and `out` is untouched.

    Raises:
        UserError: `out` is a file, or a non-empty directory without `overwrite`.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tmp = _tmp_sibling(out)
    try:
        tmp.mkdir()
        yield tmp
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


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and deleted only after the swap."""
    if out.exists():
        aside = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, aside)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(aside, out)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, out)
