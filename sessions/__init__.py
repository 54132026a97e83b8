"""Sessions on disk: the plan under edit, its history, score files, jobs, evaluations. No UI imports here.

A session is a directory `<root>/<name>/` holding session.json (an atomic snapshot), journal.jsonl (every edit,
fsynced before it is acknowledged), a lock file, and scores/ jobs/ evals/ exports/. See docs/sessions.md.

Quick use::

    from sessions import Session, describe_source
    s, created = Session.open_or_create("smol-q4", describe_source("smollm2-135m"))
    s.mark("heads", [0, 3], layer=4)        # returns once the edit is on disk
    s.undo(); s.redo()
    plan = s.plan()                          # surgery.plan.Plan, indices of the original model
    s.close()
"""

from sessions.check import ModelCheck, describe_source
from sessions.model import SESSION_VERSION, JournalEntry, Marks, SessionModel, SessionSnapshot, UIState
from sessions.paths import InvalidSessionName, UnknownSession, check_name, default_name, sessions_root
from sessions.session import ReadOnlySession, Session, SessionWriteError
from sessions.store import SessionInfo, list_sessions, remove_session

__all__ = [
    "SESSION_VERSION", "InvalidSessionName", "JournalEntry", "Marks", "ModelCheck", "ReadOnlySession", "Session",
    "SessionInfo", "SessionModel", "SessionSnapshot", "SessionWriteError", "UIState", "UnknownSession",
    "check_name", "default_name", "describe_source", "list_sessions", "remove_session", "sessions_root",
]
