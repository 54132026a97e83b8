"""`Session`: one session directory opened for editing (or read-only), with durable edits and undo/redo.

Every edit is checked, applied in memory, appended to journal.jsonl and fsynced before the method returns; only
then is it *acknowledged* (returned to the caller). If the write fails the in-memory change is taken back and the
caller gets an error. session.json is a snapshot rewritten atomically every `snapshot_every` edits and on close;
opening reads it and replays the journal entries written after it. A corrupt snapshot is rebuilt from the journal
(which starts with a `create` entry holding the model reference), a torn last journal line is ignored, a session
held by a live process or on a read-only filesystem opens read-only. `notices` says what happened, in one line each.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sessions.edits import check_mark, check_rank
from sessions.fsio import atomic_write_bytes, fsync_dir, is_not_writable
from sessions.journal import JournalWriter
from sessions.lock import SessionLock
from sessions.model import (
    BulkPayload,
    CreatePayload,
    JournalEntry,
    MarkPayload,
    SessionModel,
    SessionSnapshot,
    plan_steps_to_bulk,
)
from sessions.paths import (
    JOURNAL_FILE,
    SNAPSHOT_FILE,
    SUBDIRS,
    check_name,
    is_session_dir,
    sessions_root,
    unknown_session,
)
from sessions.recovery import load_from_disk, remove_stale_temp_files
from sessions.view import SessionView
from sessions.state import EntryError, SessionState
from surgery.errors import UserError
from surgery.plan import Plan

SNAPSHOT_EVERY = 50


class ReadOnlySession(UserError):
    """An edit on a session opened read-only."""


class SessionExists(UserError):
    """A session of that name is already there (perhaps created by another process a moment ago)."""


class SessionWriteError(UserError):
    """An edit could not be saved (disk full, I/O error); nothing changed."""


class Session(SessionView):
    """A session on disk. Open with `Session.open`, `Session.create` or `Session.open_or_create`; close when done.

    Attributes:
        name: The session's name (its directory name).
        path: The session directory.
        model: The model reference (source, fingerprint, config.json).
        readonly: True when edits are refused (another writer, read-only filesystem, or asked for).
        notices: One line per thing that happened while opening (read-only reason, torn line, recovery...).
    """

    def __init__(self, path: Path, snap: SessionSnapshot, *, snapshot_every: int = SNAPSHOT_EVERY):
        self.path = path
        self.name = snap.name or path.name
        self.model = snap.model
        self.created = snap.created
        self.readonly = True
        self.notices: list[str] = []
        self.snapshot_every = max(1, snapshot_every)
        self._state = SessionState(snap.marks, snap.ui, snap.undo, snap.redo, snap.journal_seq, snap.updated)
        self._offset = snap.journal_offset or 0
        self._lock: SessionLock | None = None
        self._writer: JournalWriter | None = None
        self._unsaved = 0  # edits since the last snapshot
        self._mutex = threading.RLock()
        self._shape: Any = None  # ModelShape from model.config, built on first use
        self._recovered = False  # snapshot rebuilt from the journal
        self._migrated_from: int | None = None
        self._journal_end = self._offset
        self._replayed = 0

    # ---- opening and closing -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, model: SessionModel, *, root: Path | None = None,
               snapshot_every: int = SNAPSHOT_EVERY) -> Session:
        """Create a new session and open it for writing.

        The directory is built under a hidden temporary name and renamed into place, so a half-created session
        never shows up.

        Raises:
            UserError: The name is invalid, a session of that name exists, or the root cannot be written.
        """
        root = Path(root) if root is not None else sessions_root()
        final = root / check_name(name)
        if is_session_dir(final):
            raise SessionExists(f"session {name!r} already exists in {root}: open it, or pick another name")
        now = time.time()
        entry = JournalEntry(seq=1, time=now, kind="create",
                             payload=CreatePayload(name=name, model=model).model_dump(mode="json"))
        snap = SessionSnapshot(name=name, created=now, updated=now, model=model, journal_seq=1,
                               journal_offset=len(entry.to_line()))
        tmp = root / f".{name}.creating-{os.getpid()}-{time.time_ns()}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            for sub in SUBDIRS:
                (tmp / sub).mkdir()
            writer = JournalWriter(tmp / JOURNAL_FILE, 0)
            try:
                writer.append(entry)  # the journal alone can rebuild the session
            finally:
                writer.close()
            atomic_write_bytes(tmp / SNAPSHOT_FILE, snap.to_json().encode())
            try:
                os.rename(tmp, final)  # fails if `final` exists and is not empty (another creator won)
            except OSError:
                if is_session_dir(final):  # another process created it a moment ago
                    raise SessionExists(f"session {name!r} already exists in {root}: open it, or pick another "
                                        "name") from None
                raise UserError(f"cannot create session {name!r}: {final} exists and is not a session") from None
            fsync_dir(root)
        except OSError as exc:
            raise UserError(f"cannot create session {name!r} in {root}: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(name, root=root, snapshot_every=snapshot_every)

    @classmethod
    def open(cls, name: str, *, root: Path | None = None, readonly: bool = False,
             snapshot_every: int = SNAPSHOT_EVERY) -> Session:
        """Open an existing session: read session.json, replay the journal after it, take the lock.

        Args:
            name: Session name.
            root: The sessions directory (default: `sessions_root()`).
            readonly: Do not take the lock and never write (listing, export, replay).
            snapshot_every: Rewrite session.json after this many edits.

        Raises:
            UnknownSession: No such session (the message lists close matches).
            UserError: The name is invalid, or neither session.json nor the journal can rebuild the session.
        """
        root = Path(root) if root is not None else sessions_root()
        path = root / check_name(name)
        if not is_session_dir(path):
            raise unknown_session(name, root)
        lock, notices = None, []
        if not readonly:
            lock = SessionLock(path)
            try:
                result = lock.acquire()
            except OSError as exc:
                if not is_not_writable(exc):
                    raise
                result = None
                notices.append(f"cannot write in {path} ({exc.strerror}): opened read-only")
            if result is not None and result.notice:
                notices.append(result.notice)
            if result is None or not result.owned:
                lock = None
        try:
            session = cls._load(path, name, notices, snapshot_every)
            if lock is not None:
                session._start_writing(lock)
            if session.readonly and session._migrated_from is not None:
                session.notices.append(f"session.json is format version {session._migrated_from}; it is upgraded "
                                       "when the session is next opened for writing")
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return session

    @classmethod
    def open_or_create(cls, name: str, model: SessionModel, *, root: Path | None = None,
                       snapshot_every: int = SNAPSHOT_EVERY) -> tuple[Session, bool]:
        """Open session `name`, or create it for `model` if there is none. Returns (session, created)."""
        root = Path(root) if root is not None else sessions_root()
        if is_session_dir(root / check_name(name)):
            return cls.open(name, root=root, snapshot_every=snapshot_every), False
        try:
            return cls.create(name, model, root=root, snapshot_every=snapshot_every), True
        except SessionExists:  # another process created it between the check and the rename: open theirs
            return cls.open(name, root=root, snapshot_every=snapshot_every), False

    @classmethod
    def _load(cls, path: Path, name: str, notices: list[str], snapshot_every: int) -> Session:
        loaded = load_from_disk(path, name)
        session = cls(path, loaded.snap, snapshot_every=snapshot_every)
        session.notices = notices + ([loaded.problem] if loaded.problem else []) + loaded.warnings
        session._recovered = loaded.problem is not None
        session._migrated_from = loaded.migrated_from
        for entry in loaded.entries:
            session._replay(entry)
        session._offset = session._journal_end = loaded.end
        session._replayed = len(loaded.entries)
        return session

    def _replay(self, entry: JournalEntry) -> None:
        if entry.seq <= self._state.seq:
            return
        if entry.kind == "create":
            self._state.seq = entry.seq
            return
        try:
            self._check_like_a_live_edit(entry)
            effect = self._state.apply(entry)
        except (EntryError, UserError, ValueError, TypeError) as exc:  # ValueError: pydantic's, int("x")
            self.notices.append(f"journal.jsonl: skipped entry {entry.seq}: {exc}")
            self._state.seq = entry.seq  # never hand its seq out again
            return
        if effect is None:
            self._state.seq = entry.seq  # journaled but changes nothing now (e.g. after a skipped entry)
        elif effect.warnings:
            self.notices.extend(f"journal.jsonl: {w}" for w in effect.warnings)

    def _check_like_a_live_edit(self, entry: JournalEntry) -> None:
        """The range checks `mark` / `bulk_mark` / `set_rank` make before journaling, made again on replay: a
        journal edited by hand (or by another version) cannot bring in a mark a live edit refuses.

        Raises:
            UserError: The entry's marks do not fit the session's model.
        """
        p = entry.payload if isinstance(entry.payload, dict) else {}
        marks = [p] if entry.kind in ("mark", "unmark") else p.get("marks") or [] if entry.kind == "bulk_mark" else []
        for m in marks:
            if isinstance(m, dict):
                check_mark(self.shape, m.get("what", ""), m.get("indices", ()), m.get("layer"))
        ranks = dict(p.get("ranks") or {}) if entry.kind == "bulk_mark" else {}
        if entry.kind == "set_param" and p.get("op") == "low_rank":
            ranks[p.get("module")] = p.get("rank")
        for module, rank in ranks.items():
            check_rank(self.shape, module, rank)

    def _start_writing(self, lock: SessionLock) -> None:
        """Open the journal for appending (cutting a torn tail) and bring session.json up to date."""
        try:
            self._writer = JournalWriter(self.path / JOURNAL_FILE, self._journal_end)
        except OSError as exc:
            lock.release()
            if not is_not_writable(exc):
                raise
            self.notices.append(f"cannot write in {self.path} ({exc.strerror}): opened read-only")
            return
        self._lock, self.readonly = lock, False
        self._offset = self._journal_end
        try:
            self._tidy_after_open()
        except OSError as exc:  # the journal holds everything; a stale snapshot only costs a longer replay
            self.notices.append(f"could not rewrite session.json ({exc.strerror or exc}); the journal has every edit")

    def _tidy_after_open(self) -> None:
        """Remove crash leftovers, keep a corrupt or old-format session.json aside, write a fresh snapshot."""
        remove_stale_temp_files(self.path)
        rewrite = self._recovered or self._replayed > 0
        if self._recovered:
            corrupt = self.path / SNAPSHOT_FILE
            if corrupt.exists():  # keep the bad file for inspection instead of overwriting it
                os.replace(corrupt, self.path / f"{SNAPSHOT_FILE}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        elif self._migrated_from is not None:
            backup = self.path / f"{SNAPSHOT_FILE}.v{self._migrated_from}"
            if not backup.exists():
                shutil.copyfile(self.path / SNAPSHOT_FILE, backup)
            self.notices.append(f"session.json upgraded from format version {self._migrated_from} (the old file is "
                                f"kept as {backup.name})")
            rewrite = True
        if rewrite:
            self._save_snapshot()

    def close(self) -> None:
        """Write a final snapshot (if anything changed) and release the lock. Safe to call twice."""
        with self._mutex:
            try:
                if self._writer is not None and self._unsaved:
                    self._save_snapshot()
            except OSError as exc:  # nothing is lost: the journal has every edit
                self.notices.append(f"could not rewrite session.json ({exc.strerror or exc}); the journal has "
                                    "every edit")
            finally:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
                if self._lock is not None:
                    self._lock.release()
                    self._lock = None
                self.readonly = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- snapshot --------------------------------------------------------------------------------------------------
    def to_snapshot(self) -> SessionSnapshot:
        """The session's current state in session.json form."""
        s = self._state
        return SessionSnapshot(name=self.name, created=self.created, updated=s.updated, model=self.model,
                               marks=s.marks.to_model(), ui=s.ui.model_copy(deep=True), undo=list(s.undo),
                               redo=list(s.redo), journal_seq=s.seq, journal_offset=self._offset)

    def _save_snapshot(self) -> None:
        atomic_write_bytes(self.path / SNAPSHOT_FILE, self.to_snapshot().to_json().encode())
        self._unsaved = 0

    def snapshot(self) -> None:
        """Rewrite session.json now (atomically). Not needed for durability: the journal already has every edit."""
        with self._mutex:
            self._require_writable()
            self._save_snapshot()

    # ---- edits -----------------------------------------------------------------------------------------------------
    def _require_writable(self) -> None:
        if self.readonly:
            reason = next((n for n in self.notices if "read-only" in n), "it was opened read-only")
            raise ReadOnlySession(f"session {self.name!r} is read-only: {reason}")

    def _commit(self, kind: str, payload: dict[str, Any]) -> JournalEntry | None:
        """Apply, journal, fsync; the returned entry is the acknowledgement. None: nothing would change."""
        with self._mutex:
            self._require_writable()
            entry = JournalEntry(seq=self._state.seq + 1, time=time.time(), kind=kind, payload=payload)
            try:
                effect = self._state.apply(entry)
            except EntryError as exc:
                raise UserError(str(exc)) from None
            if effect is None:
                return None
            try:
                self._offset = self._writer.append(entry)
            except OSError as exc:
                self._state.revert(effect)
                if self._writer.broken:  # a partial line may remain: reopening will cut it off
                    self.notices.append("the journal could not be repaired after a failed write: now read-only")
                    self.close()
                raise SessionWriteError(f"could not save the edit to {self.path / JOURNAL_FILE} "
                                        f"({exc.strerror or exc}); nothing changed") from None
            self._unsaved += 1
            if self._unsaved >= self.snapshot_every:
                try:
                    self._save_snapshot()
                except OSError as exc:  # the journal has the edit; the snapshot is only a shortcut
                    self.notices.append(f"could not rewrite session.json ({exc.strerror}); the journal has every edit")
            return entry

    def mark(self, what: str, indices: Iterable[int], layer: int | None = None) -> JournalEntry | None:
        """Mark components for removal.

        Args:
            what: "heads", "kv_groups" or "neurons" (of `layer`), or "layers", "attention", "mlp" (whole layers or
                sub-blocks; `indices` are layer indices and `layer` stays None). Indices name the original model.
            indices: The components to mark.
            layer: The layer, for heads / KV groups / neurons.

        Returns:
            The journal entry once it is on disk (the acknowledgement), or None when all were already marked.

        Raises:
            UserError: Unknown kind or an index out of range for the session's model; ReadOnlySession.
        """
        return self._commit("mark", check_mark(self.shape, what, indices, layer).model_dump(mode="json"))

    def unmark(self, what: str, indices: Iterable[int], layer: int | None = None) -> JournalEntry | None:
        """Unmark components (arguments as for `mark`); None when none of them was marked."""
        return self._commit("unmark", check_mark(self.shape, what, indices, layer).model_dump(mode="json"))

    def bulk_mark(self, marks: Iterable[dict | MarkPayload], *, ranks: dict[str, int] | None = None,
                  replace: bool = False, note: str | None = None) -> JournalEntry | None:
        """Apply many marks (and low-rank ranks) as ONE edit (one undo step), e.g. a suggestion.

        Args:
            marks: Items with `what`, `indices` and (for per-layer kinds) `layer`.
            ranks: Low-rank marks, module path -> rank.
            replace: Clear every existing mark first.
            note: Where the marks came from (kept in the journal).
        """
        checked = []
        for m in marks:
            m = m.model_dump() if isinstance(m, MarkPayload) else dict(m)
            checked.append(check_mark(self.shape, m.get("what", ""), m.get("indices", ()), m.get("layer")))
        for module, rank in (ranks or {}).items():
            check_rank(self.shape, module, rank)
        payload = BulkPayload(marks=checked, ranks=dict(ranks or {}), replace=replace, note=note)
        return self._commit("bulk_mark", payload.model_dump(mode="json", exclude_none=True))

    def load_plan(self, plan: Plan, *, note: str = "plan") -> JournalEntry | None:
        """Replace the marks with those of a plan (one undoable edit)."""
        bulk = plan_steps_to_bulk([s.model_dump(mode="json") for s in plan.steps])
        return self.bulk_mark(bulk.marks, ranks=bulk.ranks, replace=True, note=note)

    def clear(self) -> JournalEntry | None:
        """Unmark everything (one undoable edit)."""
        return self.bulk_mark([], replace=True, note="clear")

    def set_rank(self, module: str, rank: int | None) -> JournalEntry | None:
        """Mark a Linear for low-rank factorisation at `rank` (None removes the mark)."""
        check_rank(self.shape, module, rank)
        return self._commit("set_param", {"op": "low_rank", "module": module, "rank": rank})

    def set_theme(self, theme: str) -> JournalEntry | None:
        """Remember the UI theme (journaled like any edit, but not part of undo)."""
        return self._commit("theme", {"theme": theme})

    def set_ui(self, key: str, value: str | int | float | bool | None) -> JournalEntry | None:
        """Remember a piece of UI state ("metric", or any other key); not part of undo."""
        if key == "theme":
            return self.set_theme(str(value))
        return self._commit("ui", {"key": key, "value": value})

    def undo(self) -> JournalEntry | None:
        """Take back the newest plan edit (also one made before a restart); None when there is nothing to undo."""
        with self._mutex:
            target = self._state.undo[-1].seq if self._state.undo else None
            return self._commit("undo", {"target": target}) if target is not None else None

    def redo(self) -> JournalEntry | None:
        """Re-apply the newest undone edit; None when there is nothing to redo (a new edit clears redo)."""
        with self._mutex:
            target = self._state.redo[-1].seq if self._state.redo else None
            return self._commit("redo", {"target": target}) if target is not None else None
