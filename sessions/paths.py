"""Where sessions live and what a session may be called.

Root: `<home>/sessions`, where home is `--home` (passed in by the front end), else `$WORKBENCH_HOME`, else the
platform's user data directory for "workbench" (`~/.local/share/workbench` on Linux). A session name is one
directory name: path separators and `..` are refused, so a name can never point outside the root.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import platformdirs

from surgery.errors import UserError

SNAPSHOT_FILE = "session.json"
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "lock"
SUBDIRS = ("scores", "jobs", "evals", "exports")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


class InvalidSessionName(UserError):
    """A session name that is not a plain directory name."""


class UnknownSession(UserError):
    """No session of that name under the root."""


def sessions_root(home: str | Path | None = None) -> Path:
    """The directory holding one folder per session (not created here).

    Args:
        home: The workbench home (`--home`); None means `$WORKBENCH_HOME`, else the platform's user data dir.

    Returns:
        `<home>/sessions` as an absolute path.
    """
    base = home or os.environ.get("WORKBENCH_HOME") or platformdirs.user_data_dir("workbench")
    return (Path(base).expanduser() / "sessions").absolute()


def check_name(name: str) -> str:
    """Return `name` if it is a valid session name.

    Raises:
        InvalidSessionName: It is empty, contains a path separator or `..`, starts with a dot or dash, or uses
            characters other than letters, digits, `.`, `_`, `+` and `-` (at most 100 of them).
    """
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not name:
        raise InvalidSessionName("empty session name: use letters, digits, '.', '_', '+' or '-'")
    if any(s in name for s in seps):
        raise InvalidSessionName(f"invalid session name {name!r}: path separators are not allowed")
    if ".." in name:
        raise InvalidSessionName(f"invalid session name {name!r}: '..' is not allowed")
    if not _NAME.match(name):
        raise InvalidSessionName(
            f"invalid session name {name!r}: start with a letter or digit, then use letters, digits, '.', '_', "
            "'+' or '-' (at most 100 characters)"
        )
    return name


def session_dir(name: str, root: Path) -> Path:
    """The directory of session `name` under `root` (the name is checked first)."""
    return root / check_name(name)


def is_session_dir(path: Path) -> bool:
    """Whether `path` looks like a session: a directory holding a snapshot or a journal."""
    return path.is_dir() and ((path / SNAPSHOT_FILE).exists() or (path / JOURNAL_FILE).exists())


def list_names(root: Path) -> list[str]:
    """Names of the sessions under `root`, sorted; hidden entries (temporary, being removed) are skipped."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and is_session_dir(p))


def unknown_session(name: str, root: Path) -> UnknownSession:
    """The error for a missing session, naming the close matches (or all sessions when there are few)."""
    names = list_names(root)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        hint = "did you mean: " + ", ".join(close) + "?"
    elif names:
        hint = "sessions: " + ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    else:
        hint = "there are no sessions yet (workbench open SOURCE --session NAME creates one)"
    return UnknownSession(f"no session named {name!r} in {root}; {hint}")


def default_name(source: str) -> str:
    """A session name derived from a model source: `./models/SmolLM2-135M/` -> `SmolLM2-135M`."""
    text = str(source).strip().rstrip("/\\")
    base = re.split(r"[/\\]", text)[-1] if text else ""
    if base.lower().endswith(".gguf"):
        base = base[:-5]
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", base).strip(".-_+")
    slug = re.sub(r"\.{2,}", ".", slug)[:100]
    return slug or "session"
