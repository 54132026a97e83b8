"""Reading a session back: session.json (migrated if old), then the journal entries written after it.

The snapshot is a shortcut, the journal is the truth: when session.json is missing, unreadable or invalid, the
session is rebuilt from journal.jsonl alone (its first entry, `create`, holds the name and the model reference) and
the caller is told so. Only a session.json from a *newer* workbench is refused outright, since rebuilding would
silently drop whatever that version knows and this one does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sessions.journal import JournalRead, read_journal
from sessions.lock import pid_alive
from sessions.model import (
    SESSION_VERSION,
    CreatePayload,
    FormatError,
    JournalEntry,
    NewerFormatError,
    SessionSnapshot,
    load_snapshot,
)
from sessions.paths import JOURNAL_FILE, SNAPSHOT_FILE
from surgery.errors import UserError

_TEMP = re.compile(r"^\..+\.(\d+)-[0-9a-f]+\.tmp$")  # sessions.fsio.atomic_write_bytes temp files


@dataclass
class Loaded:
    """What is on disk for one session.

    Attributes:
        snap: The snapshot (rebuilt from the `create` entry when session.json was unusable).
        entries: Journal entries after the snapshot, to replay in order.
        end: Byte offset after the last good journal line (appends continue here).
        warnings: One line per torn or corrupt journal line.
        problem: Why session.json was not used (None when it was).
        migrated_from: The older format version session.json was written in, if any.
    """

    snap: SessionSnapshot
    entries: list[JournalEntry]
    end: int
    warnings: list[str] = field(default_factory=list)
    problem: str | None = None
    migrated_from: int | None = None


def read_tail(journal: Path, snap: SessionSnapshot | None) -> JournalRead:
    """The journal from the snapshot's offset when that is a line boundary holding the next seq, else from the
    start (no snapshot, an old format without offsets, or a journal that was replaced)."""
    offset = snap.journal_offset if snap is not None else None
    if offset:
        try:
            with open(journal, "rb") as f:
                f.seek(offset - 1)
                boundary = f.read(1) == b"\n"
        except OSError:
            boundary = False
        if boundary:
            read = read_journal(journal, offset)
            if not read.entries or read.entries[0][0].seq == snap.journal_seq + 1:
                return read
    return read_journal(journal, 0)


def _read_snapshot(path: Path) -> tuple[SessionSnapshot | None, str | None, int | None]:
    """(snapshot, problem, version it was written in); problem says why there is no snapshot."""
    try:
        snap, version = load_snapshot(json.loads((path / SNAPSHOT_FILE).read_bytes()))
        return snap, None, version
    except FileNotFoundError:
        return None, "session.json is missing", None
    except OSError as exc:
        return None, f"session.json cannot be read ({exc.strerror})", None
    except NewerFormatError:
        raise
    except FormatError as exc:
        return None, f"session.json is corrupt ({exc})", None
    except (ValueError, RecursionError) as exc:  # bad JSON or bad UTF-8
        return None, f"session.json is corrupt ({str(exc).splitlines()[0][:100]})", None


def load_from_disk(path: Path, name: str) -> Loaded:
    """Read session.json and the journal tail of the session directory `path`.

    Raises:
        NewerFormatError: session.json was written by a newer workbench.
        UserError: session.json is unusable and the journal cannot rebuild the session.
    """
    snap, problem, version = _read_snapshot(path)
    read = read_tail(path / JOURNAL_FILE, snap)
    entries = [e for e, _ in read.entries if snap is None or e.seq > snap.journal_seq]
    if snap is None:
        if not entries or entries[0].kind != "create":
            raise UserError(f"session {name!r} cannot be opened: {problem} and journal.jsonl does not start with "
                            "the session's creation")
        first = entries[0]
        payload = CreatePayload.model_validate(first.payload)
        snap = SessionSnapshot(name=payload.name, created=first.time, updated=first.time, model=payload.model)
        problem = f"{problem}: rebuilt the session from journal.jsonl ({len(entries)} entries)"
    migrated = version if version is not None and version < SESSION_VERSION else None
    return Loaded(snap, entries, read.end, _journal_loss(path / JOURNAL_FILE, snap) + list(read.warnings), problem,
                  migrated)


def _journal_loss(journal: Path, snap: SessionSnapshot) -> list[str]:
    """A notice when journal.jsonl is gone or shorter than the snapshot says it was (deleted, emptied, replaced):
    edits journaled after session.json was last written are then lost, and the user must hear of it."""
    expected = snap.journal_offset or 0
    if not expected:
        return []
    try:
        size = journal.stat().st_size
    except FileNotFoundError:
        return [f"journal.jsonl is missing (session.json expected {expected} bytes of it): edits made after the "
                "last snapshot are lost; the session is as of that snapshot"]
    if size < expected:
        return [f"journal.jsonl holds {size} bytes but session.json expected at least {expected} (it was emptied "
                "or replaced): edits made after the last snapshot may be lost; the session is as of that snapshot"]
    return []


def remove_stale_temp_files(path: Path) -> None:
    """Delete temp files of atomic writes interrupted by a crash (their writer's pid is gone)."""
    for p in path.glob(".*.tmp"):
        m = _TEMP.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                p.unlink()
