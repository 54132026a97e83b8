"""journal.jsonl: every edit, one JSON line each, appended and fsynced before the edit counts as done.

An edit is *acknowledged* when `JournalWriter.append` returns: the whole line (newline included) has been written
and `fsync` has returned. A crash can therefore leave at most one incomplete line, at the very end; `read_journal`
ignores it with a warning and the writer cuts it off before appending, so the next line starts clean. A complete but
unreadable line in the middle (bit rot, a hand edit) is skipped with a warning; nothing here raises on bad content.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from sessions.fsio import fsync_dir, fsync_fd
from sessions.model import JournalEntry


@dataclass
class JournalRead:
    """What `read_journal` found from a start offset on.

    Attributes:
        entries: (entry, byte offset just after its line), in file order.
        warnings: One line per torn or corrupt line ignored.
        end: Byte offset where the next append must start (before a torn tail).
        size: Bytes in the file.
    """

    entries: list[tuple[JournalEntry, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    end: int = 0
    size: int = 0

    @property
    def torn(self) -> bool:
        return self.end < self.size


def _parse(line: bytes) -> JournalEntry | None:
    try:
        return JournalEntry.model_validate(json.loads(line))
    except (ValueError, ValidationError, UnicodeDecodeError, RecursionError):
        return None


def read_journal(path: Path, start: int = 0) -> JournalRead:
    """Read the journal from byte `start` (0: the whole file); a missing file reads as empty.

    Args:
        path: journal.jsonl.
        start: A byte offset at a line boundary (from a snapshot).
    """
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return JournalRead()
    result = JournalRead(end=start, size=start + len(data))
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:  # no newline: the write was cut short; never acknowledged
            result.warnings.append(
                f"journal.jsonl: ignored a torn last line ({len(data) - pos} bytes at byte {start + pos}) left by an "
                "interrupted write"
            )
            break
        line = data[pos:nl]
        entry = _parse(line) if line.strip() else None
        if entry is not None:
            result.entries.append((entry, start + nl + 1))
            result.end = start + nl + 1
        elif line.strip() and nl + 1 == len(data):
            # the last line, complete but unreadable: what a crash mid-write leaves on some filesystems
            result.warnings.append(
                f"journal.jsonl: ignored an unreadable last line at byte {start + pos} left by an interrupted write"
            )
            break
        else:
            if line.strip():
                result.warnings.append(f"journal.jsonl: skipped a corrupt line at byte {start + pos}")
            result.end = start + nl + 1
        pos = nl + 1
    return result


class JournalWriter:
    """Appends entries to journal.jsonl durably. One writer per session (the lock sees to that)."""

    def __init__(self, path: Path, end: int):
        """Open for appending, first cutting the file back to `end` (dropping a torn tail).

        Args:
            path: journal.jsonl (created if missing).
            end: Offset after the last good line, from `read_journal`.
        """
        created = not path.exists()
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if os.fstat(self._fd).st_size > end:
                os.ftruncate(self._fd, end)
                fsync_fd(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self.offset = end
        self.broken = False
        if created:
            fsync_dir(path.parent)

    def append(self, entry: JournalEntry) -> int:
        """Write one entry and fsync; when this returns, the entry survives a crash.

        Returns:
            The byte offset just after the entry.

        Raises:
            OSError: The write or fsync failed (disk full, I/O error); the partial line is cut off again.
        """
        data = entry.to_line()
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            fsync_fd(self._fd)
        except OSError:
            try:  # leave no half line for the next append to glue onto
                os.ftruncate(self._fd, self.offset)
            except OSError:
                self.broken = True  # the file may end in a partial line: no more appends
            raise
        self.offset += len(data)
        return self.offset

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
