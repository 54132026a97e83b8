"""The read side of a `Session`: marks, history depth, the plan, validation, contents, summary, apply.

Kept apart from the write side (session.py: opening, locking, journaling edits) so each stays small. Every method
here only reads the in-memory state, which `Session` keeps equal to what is on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sessions.check import ModelCheck, check_model
from sessions.contents import SessionContents, list_contents
from sessions.extras import PLAN_EXTRAS_KEY, merge_plan_extras
from sessions.lock import LockInfo, SessionLock, pid_alive, read_lock
from sessions.model import Marks, SessionModel, UIState
from sessions.paths import LOCK_FILE
from sessions.state import SessionState
from surgery.errors import PlanError, UserError
from surgery.plan import ModelRef, Plan


class SessionView:
    """Queries on a session's state (mixed into `Session`)."""

    name: str
    path: Path
    model: SessionModel
    created: float
    readonly: bool
    notices: list[str]
    _state: SessionState
    _lock: SessionLock | None
    _shape: Any

    @property
    def seq(self) -> int:
        """Seq of the newest journal entry in effect."""
        return self._state.seq

    @property
    def updated(self) -> float:
        """Time of the last change (seconds since the epoch)."""
        return self._state.updated

    @property
    def marks(self) -> Marks:
        """The marks (a copy)."""
        return self._state.marks.to_model()

    def marked(self, what: str, layer: int | None = None) -> set[int]:
        """Marked indices of one kind (of `layer` for heads / KV groups / neurons)."""
        return self._state.marks.get(what, layer)

    @property
    def ranks(self) -> dict[str, int]:
        """Low-rank marks, module path -> rank."""
        return dict(self._state.marks.low_rank)

    @property
    def mark_count(self) -> int:
        return self._state.marks.count()

    @property
    def ui(self) -> UIState:
        return self._state.ui.model_copy(deep=True)

    @property
    def can_undo(self) -> bool:
        return bool(self._state.undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._state.redo)

    @property
    def undo_depth(self) -> int:
        """How many edits `undo` can take back (the newest HISTORY_LIMIT plan edits)."""
        return len(self._state.undo)

    @property
    def redo_depth(self) -> int:
        return len(self._state.redo)

    @property
    def shape(self):
        """The model's ModelShape from the stored config.json (None when unknown or unsupported)."""
        if self._shape is None and self.model.config is not None:
            from surgery.shapes import shape_from_config

            try:
                self._shape = shape_from_config(self.model.config)
            except (UserError, KeyError, TypeError, ValueError):
                self._shape = False
        return self._shape or None

    def plan(self) -> Plan:
        """The marks as a plan for the session's model (indices name the original model)."""
        return Plan(model=ModelRef(source=self.model.source, fingerprint=self.model.fingerprint),
                    steps=self._state.marks.to_steps(), provenance={"session": self.name, "journal_seq": self.seq})

    def full_plan(self) -> Plan:
        """The marks plus the steps kept in the UI state (sessions.extras): the plan the TUI shows.

        Raises:
            PlanError: The kept steps no longer parse (a one-line reason; nothing is dropped silently).
        """
        try:
            return merge_plan_extras(self.plan(), self._state.ui.extra.get(PLAN_EXTRAS_KEY))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise PlanError([f"session {self.name!r}: its width / expert / reconstruct steps do not parse "
                             f"({type(exc).__name__}: {exc})"]) from None

    def validate(self):
        """Validate the plan against the session's model config; returns the Resolution.

        Raises:
            PlanError: Every problem (e.g. the GQA rule) at once.
            UserError: The session holds no config.json for its model.
        """
        from surgery.resolve import resolve_plan

        if self.shape is None:
            raise UserError(f"session {self.name!r} has no usable config.json for its model: open it with its model")
        return resolve_plan(self.full_plan(), self.shape)

    def check_model(self, other: SessionModel) -> ModelCheck:
        """Compare the session's model with `other` (fingerprint) and re-validate the plan against its config."""
        return check_model(self.model, self.full_plan(), other)

    def contents(self) -> SessionContents:
        """Score files, jobs (with status), evaluation records and exports stored in the session."""
        return list_contents(self.path)

    def lock_holder(self) -> str | None:
        """Who else holds the session (one line), when it is a live process or one on another host."""
        info = read_lock(self.path / LOCK_FILE)
        if not isinstance(info, LockInfo) or (self._lock is not None and self._lock.still_mine()):
            return None
        import socket

        if info.host == socket.gethostname() and not pid_alive(info.pid, info.started):
            return None
        return info.describe()

    def summary(self) -> dict:
        """A JSON-ready description (what `workbench sessions show --json` prints)."""
        plan = self.plan()
        return {
            "name": self.name,
            "path": str(self.path),
            "model": {"source": self.model.source, "kind": self.model.kind, "fingerprint": self.model.fingerprint},
            "created": self.created,
            "updated": self.updated,
            "journal_seq": self.seq,
            "marks": self._state.marks.counts(),
            "mark_count": self.mark_count,
            "plan_steps": len(plan.steps),
            "undo_depth": self.undo_depth,
            "redo_depth": self.redo_depth,
            "ui": self._state.ui.model_dump(mode="json"),
            "readonly": self.readonly,
            "locked_by": self.lock_holder(),
            "notices": list(self.notices),
            "contents": self.contents().to_dict(),
        }

    def apply(self, out: str | Path, *, model: str | None = None, force: bool = False, overwrite: bool = False,
              dtype: str = "auto", progress: Callable[[str], None] | None = None):
        """Apply the session's plan to its model (or `model`) and write `out` via surgery.pipeline.apply_to_source.

        Returns:
            surgery.pipeline.ApplyResult.
        """
        from surgery.pipeline import apply_to_source  # torch: only when asked

        return apply_to_source(self.full_plan(), out, model, force=force, overwrite=overwrite, dtype=dtype,
                               progress=progress)
