"""The session's file formats: the snapshot (session.json), the journal line, and the migrations between versions.

Both are pydantic models with `extra="forbid"` and a version field, written as JSON with sorted keys. A snapshot
written by an older workbench is migrated on read (`load_snapshot`); one written by a newer workbench is refused
with a clear message instead of being misread. docs/sessions.md describes every field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from surgery.errors import PlanError, UserError

SESSION_VERSION = 2
JOURNAL_VERSION = 1

NonNegInt = Annotated[int, Field(ge=0)]
Scalar = str | int | float | bool | None

# What a mark can name. "heads", "kv_groups", "neurons" live inside one layer; "layers" (whole decoder layers),
# "attention" and "mlp" (sub-blocks dropped) take layer indices. Indices name the ORIGINAL model, like plans.
PER_LAYER = ("heads", "kv_groups", "neurons")
LAYER_LEVEL = ("layers", "attention", "mlp")
MARK_KINDS = PER_LAYER + LAYER_LEVEL

EntryKind = Literal["create", "mark", "unmark", "bulk_mark", "set_param", "theme", "ui", "undo", "redo"]
PLAN_EDITS = ("mark", "unmark", "bulk_mark", "set_param")  # the kinds that undo/redo act on


class FormatError(UserError):
    """A session file that cannot be read as any known version."""


class NewerFormatError(FormatError):
    """A session file written by a newer workbench: refused rather than misread (and never "recovered")."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionModel(_Strict):
    """The model a session works on: what the user opened, the weights' fingerprint and its config.json."""

    source: str = Field(description="absolute directory / .gguf path, hub id or alias")
    kind: str | None = Field(default=None, description="hf_dir, gguf, hub or demo")
    fingerprint: str | None = Field(default=None, description="sha256 of the weights, 'sha256:<hex>'")
    config: dict[str, Any] | None = Field(default=None, description="config.json, so edits validate offline")


class Marks(_Strict):
    """The plan under edit as sets of marked components (sorted lists on disk)."""

    heads: dict[int, list[NonNegInt]] = Field(default_factory=dict)
    kv_groups: dict[int, list[NonNegInt]] = Field(default_factory=dict)
    neurons: dict[int, list[NonNegInt]] = Field(default_factory=dict)
    layers: list[NonNegInt] = Field(default_factory=list)
    attention: list[NonNegInt] = Field(default_factory=list)
    mlp: list[NonNegInt] = Field(default_factory=list)
    low_rank: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)


class Change(_Strict):
    """One effective change to the marks; undo applies the inverse."""

    what: str
    layer: int | None = None
    added: list[int] = Field(default_factory=list)
    removed: list[int] = Field(default_factory=list)
    module: str | None = None  # low_rank only
    before: int | None = None
    after: int | None = None

    def inverse(self) -> Change:
        return Change(what=self.what, layer=self.layer, added=self.removed, removed=self.added,
                      module=self.module, before=self.after, after=self.before)


class HistoryItem(_Strict):
    """One undoable edit: the journal seq that made it and what it changed."""

    seq: int
    kind: str
    changes: list[Change]


class UIState(_Strict):
    """What the UI restores on open."""

    theme: str | None = None
    metric: str | None = None
    extra: dict[str, Scalar] = Field(default_factory=dict)


class SessionSnapshot(_Strict):
    """session.json, format version 2."""

    version: Literal[2] = SESSION_VERSION
    name: str
    created: float
    updated: float
    model: SessionModel
    marks: Marks = Field(default_factory=Marks)
    ui: UIState = Field(default_factory=UIState)
    undo: list[HistoryItem] = Field(default_factory=list)
    redo: list[HistoryItem] = Field(default_factory=list)
    journal_seq: NonNegInt = Field(default=0, description="seq of the last journal entry folded in")
    journal_offset: NonNegInt | None = Field(default=None, description="byte offset just after that entry")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True) + "\n"


class JournalEntry(_Strict):
    """One line of journal.jsonl."""

    v: Literal[1] = JOURNAL_VERSION
    seq: Annotated[int, Field(ge=1)]
    time: float
    kind: EntryKind
    payload: dict[str, Any] = Field(default_factory=dict)

    def to_line(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")) + "\n").encode()


# Payloads, one model per entry kind (validated when an entry is applied).
class MarkPayload(_Strict):
    what: Literal["heads", "kv_groups", "neurons", "layers", "attention", "mlp"]
    layer: NonNegInt | None = None
    indices: Annotated[list[NonNegInt], Field(min_length=1)]


class BulkPayload(_Strict):
    marks: list[MarkPayload] = Field(default_factory=list)
    ranks: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    replace: bool = False
    note: str | None = None


class ParamPayload(_Strict):
    op: Literal["low_rank"] = "low_rank"
    module: str = Field(min_length=1)
    rank: Annotated[int, Field(ge=1)] | None


class ThemePayload(_Strict):
    theme: str


class UIPayload(_Strict):
    key: str = Field(min_length=1)
    value: Scalar


class HistoryPayload(_Strict):
    target: int | None = None


class CreatePayload(_Strict):
    name: str
    model: SessionModel


PAYLOADS: dict[str, type[_Strict]] = {
    "create": CreatePayload, "mark": MarkPayload, "unmark": MarkPayload, "bulk_mark": BulkPayload,
    "set_param": ParamPayload, "theme": ThemePayload, "ui": UIPayload, "undo": HistoryPayload,
    "redo": HistoryPayload,
}


def plan_steps_to_bulk(steps: list[dict]) -> BulkPayload:
    """Plan steps (as dicts) -> the marks and ranks that say the same thing.

    Raises:
        PlanError: The steps are not valid plan steps.
    """
    from surgery.plan import parse_plan

    plan = parse_plan({"version": 1, "steps": steps})
    marks: list[MarkPayload] = []
    ranks: dict[str, int] = {}
    others: list[str] = []
    fields = {"prune_heads": ("heads", "heads"), "prune_kv_groups": ("kv_groups", "groups"),
              "prune_neurons": ("neurons", "neurons")}
    for step in plan.steps:
        if step.op in fields:
            what, attr = fields[step.op]
            marks.append(MarkPayload(what=what, layer=step.layer, indices=list(getattr(step, attr))))
        elif step.op == "drop_layers":
            marks.append(MarkPayload(what="layers", indices=list(step.layers)))
        elif step.op in ("drop_attention", "drop_mlp"):
            marks.append(MarkPayload(what=step.op.removeprefix("drop_"), indices=[step.layer]))
        elif step.op == "low_rank":
            ranks[step.module] = step.rank
        else:
            others.append(step.op)
    if others:
        # Why refuse rather than skip: a silently dropped width cut or refit would change what the plan does.
        raise PlanError([f"a session's marks cannot hold {', '.join(sorted(set(others)))} steps (only heads, "
                         "KV groups, neurons, layers and low-rank ranks): keep them in its UI state "
                         "(sessions.extras.split_plan)"])
    return BulkPayload(marks=marks, ranks=ranks)


def _marks_from_bulk(bulk: BulkPayload) -> Marks:
    per_layer: dict[str, dict[int, set[int]]] = {k: {} for k in PER_LAYER}
    level: dict[str, set[int]] = {k: set() for k in LAYER_LEVEL}
    for m in bulk.marks:
        if m.what in PER_LAYER:
            per_layer[m.what].setdefault(m.layer, set()).update(m.indices)
        else:
            level[m.what].update(m.indices)
    return Marks(**{k: {layer: sorted(v) for layer, v in d.items()} for k, d in per_layer.items()},
                 **{k: sorted(v) for k, v in level.items()}, low_rank=dict(bulk.ranks))


def _v1_to_v2(data: dict) -> dict:
    """Version 1 (the first sketch) kept the plan under edit as plan steps, the theme at top level, no history."""
    bulk = plan_steps_to_bulk(list((data.get("plan") or {}).get("steps") or []))
    created = float(data.get("created") or 0.0)
    model = dict(data.get("model") or {})
    if not model.get("source"):
        raise FormatError("session.json (version 1) names no model source")
    return {
        "version": 2,
        "name": data.get("name") or "",
        "created": created,
        "updated": float(data.get("updated") or created),
        "model": model,
        "marks": _marks_from_bulk(bulk).model_dump(mode="json"),
        "ui": {"theme": data.get("theme")},
        "undo": [],
        "redo": [],
        "journal_seq": int(data.get("journal_seq") or 0),
        "journal_offset": None,  # v1 kept no offset: the journal is scanned for entries after journal_seq
    }


# version N -> a function turning a version-N document into a version-N+1 document
MIGRATIONS = {1: _v1_to_v2}


def load_snapshot(data: Any) -> tuple[SessionSnapshot, int]:
    """Validate a decoded session.json, migrating older versions first.

    Returns:
        The snapshot in the current format and the version it was written in.

    Raises:
        FormatError: Not an object, no or unknown version, a newer version, or fields that do not validate.
    """
    if not isinstance(data, dict):
        raise FormatError(f"session.json holds a {type(data).__name__}, not an object")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FormatError("session.json has no integer 'version'")
    if version > SESSION_VERSION:
        raise NewerFormatError(f"session.json is format version {version}, written by a newer workbench; this one "
                               f"reads up to version {SESSION_VERSION}: upgrade the workbench")
    original = version
    while version < SESSION_VERSION:
        if version not in MIGRATIONS:
            raise FormatError(f"session.json format version {version} is not supported")
        try:
            data = MIGRATIONS[version](data)
        except UserError as exc:
            raise FormatError(f"cannot migrate session.json from version {version}: {exc}") from None
        version = data["version"]
    try:
        return SessionSnapshot.model_validate(data), original
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "session.json"
        raise FormatError(f"session.json: {where}: {first['msg']} ({exc.error_count()} problem(s))") from None
