"""The plan under edit in memory, and the one function that changes it: `SessionState.apply(entry)`.

Live edits and replay both go through `apply`, so a session rebuilt from its journal is exactly the session that
wrote it. Each plan edit records what it actually changed (`Change`s); undo applies the inverse of the newest one
and moves it to the redo stack, redo moves it back. Both stacks live in the snapshot, so undo works across
restarts; the journal keeps the complete history (the stacks keep the newest `HISTORY_LIMIT` edits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import ValidationError

from sessions.model import (
    LAYER_LEVEL,
    PAYLOADS,
    PER_LAYER,
    PLAN_EDITS,
    BulkPayload,
    Change,
    HistoryItem,
    JournalEntry,
    MarkPayload,
    Marks,
    UIState,
)

HISTORY_LIMIT = 1000


class EntryError(ValueError):
    """A journal entry whose payload does not fit its kind (skipped on replay with a warning)."""


def module_key(module: str) -> list:
    """Sort key that puts model.layers.2 before model.layers.10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"\.", module)]


class MarkState:
    """Marked components as sets (per layer for heads / KV groups / neurons)."""

    def __init__(self, marks: Marks | None = None):
        marks = marks or Marks()
        self.per_layer: dict[str, dict[int, set[int]]] = {
            k: {layer: set(v) for layer, v in getattr(marks, k).items() if v} for k in PER_LAYER
        }
        self.level: dict[str, set[int]] = {k: set(getattr(marks, k)) for k in LAYER_LEVEL}
        self.low_rank: dict[str, int] = dict(marks.low_rank)

    def get(self, what: str, layer: int | None = None) -> set[int]:
        """The marked indices of one kind (a copy)."""
        if what in PER_LAYER:
            return set(self.per_layer[what].get(layer, ()))
        return set(self.level[what])

    def _target(self, what: str, layer: int | None) -> set[int]:
        if what in PER_LAYER:
            return self.per_layer[what].setdefault(layer, set())
        return self.level[what]

    def mark(self, m: MarkPayload, add: bool) -> Change | None:
        """Mark (or unmark) and return what changed, or None when nothing did."""
        if m.what in PER_LAYER and m.layer is None:
            raise EntryError(f"{m.what} marks need a layer")
        if m.what in LAYER_LEVEL and m.layer is not None:
            raise EntryError(f"{m.what} marks take layer indices, not a layer")
        current = self.get(m.what, m.layer)
        delta = sorted(set(m.indices) - current) if add else sorted(set(m.indices) & current)
        if not delta:
            return None
        change = Change(what=m.what, layer=m.layer, added=delta if add else [], removed=[] if add else delta)
        self.apply(change)
        return change

    def set_rank(self, module: str, rank: int | None) -> Change | None:
        before = self.low_rank.get(module)
        if before == rank:
            return None
        change = Change(what="low_rank", module=module, before=before, after=rank)
        self.apply(change)
        return change

    def apply(self, change: Change) -> None:
        """Apply one change (or, given `change.inverse()`, take it back)."""
        if change.what == "low_rank":
            if change.after is None:
                self.low_rank.pop(change.module, None)
            else:
                self.low_rank[change.module] = change.after
            return
        target = self._target(change.what, change.layer)
        target.difference_update(change.removed)
        target.update(change.added)
        if change.what in PER_LAYER and not target:
            del self.per_layer[change.what][change.layer]

    def clear(self) -> list[Change]:
        """Unmark everything; returns the changes made."""
        changes = [Change(what=k, layer=layer, removed=sorted(v))
                   for k in PER_LAYER for layer, v in sorted(self.per_layer[k].items()) if v]
        changes += [Change(what=k, removed=sorted(self.level[k])) for k in LAYER_LEVEL if self.level[k]]
        changes += [Change(what="low_rank", module=m, before=r) for m, r in sorted(self.low_rank.items())]
        for c in changes:
            self.apply(c)
        return changes

    def count(self) -> int:
        """Number of marked components (a low-rank module counts as one)."""
        return (sum(len(v) for k in PER_LAYER for v in self.per_layer[k].values())
                + sum(len(v) for v in self.level.values()) + len(self.low_rank))

    def counts(self) -> dict[str, int]:
        """Marked components per kind."""
        out = {k: sum(len(v) for v in self.per_layer[k].values()) for k in PER_LAYER}
        out.update({k: len(v) for k, v in self.level.items()})
        out["low_rank"] = len(self.low_rank)
        return out

    def to_model(self) -> Marks:
        per_layer = {k: {layer: sorted(v) for layer, v in sorted(d.items()) if v} for k, d in self.per_layer.items()}
        return Marks(**per_layer,
                     **{k: sorted(v) for k, v in self.level.items()}, low_rank=dict(sorted(self.low_rank.items())))

    def to_steps(self) -> list[dict]:
        """The marks as plan steps (original-model indices), in a stable order."""
        steps: list[dict] = []
        if self.level["layers"]:
            steps.append({"op": "drop_layers", "layers": sorted(self.level["layers"])})
        layers = set(self.level["attention"]) | set(self.level["mlp"])
        for d in self.per_layer.values():
            layers |= {layer for layer, v in d.items() if v}
        for layer in sorted(layers):
            for what, op, key in (("kv_groups", "prune_kv_groups", "groups"), ("heads", "prune_heads", "heads"),
                                  ("neurons", "prune_neurons", "neurons")):
                if self.per_layer[what].get(layer):
                    steps.append({"op": op, "layer": layer, key: sorted(self.per_layer[what][layer])})
            if layer in self.level["attention"]:
                steps.append({"op": "drop_attention", "layer": layer})
            if layer in self.level["mlp"]:
                steps.append({"op": "drop_mlp", "layer": layer})
        for module in sorted(self.low_rank, key=module_key):
            steps.append({"op": "low_rank", "module": module, "rank": self.low_rank[module]})
        return steps


@dataclass
class Effect:
    """What one applied entry did, enough to take it back if journaling it fails."""

    changes: list[Change]
    undo: list[HistoryItem]
    redo: list[HistoryItem]
    ui: UIState
    seq: int
    updated: float
    warnings: list[str] = field(default_factory=list)


class SessionState:
    """Marks, UI state, undo/redo stacks and the journal position of one session."""

    def __init__(self, marks: Marks | None = None, ui: UIState | None = None, undo: list[HistoryItem] | None = None,
                 redo: list[HistoryItem] | None = None, seq: int = 0, updated: float = 0.0):
        self.marks = MarkState(marks)
        self.ui = ui or UIState()
        self.undo = list(undo or [])
        self.redo = list(redo or [])
        self.seq = seq
        self.updated = updated

    def apply(self, entry: JournalEntry) -> Effect | None:
        """Apply one entry; returns None (and changes nothing) when it would change nothing.

        Raises:
            EntryError: The payload does not fit the kind; nothing was changed.
        """
        try:
            payload = PAYLOADS[entry.kind].model_validate(entry.payload)
        except ValidationError as exc:
            raise EntryError(f"{entry.kind} entry {entry.seq}: {exc.errors()[0]['msg']}") from None
        effect = Effect([], list(self.undo), list(self.redo), self.ui.model_copy(deep=True), self.seq, self.updated)
        try:
            changed = self._dispatch(entry, payload, effect)
        except BaseException:
            self.revert(effect)
            raise
        if not changed:
            self.revert(effect)
            return None
        self.seq, self.updated = entry.seq, entry.time
        return effect

    def _dispatch(self, entry: JournalEntry, payload, effect: Effect) -> bool:
        kind = entry.kind
        if kind in ("mark", "unmark"):
            change = self.marks.mark(payload, add=kind == "mark")
            effect.changes = [change] if change else []
        elif kind == "bulk_mark":
            self._bulk(payload, effect.changes)
        elif kind == "set_param":
            change = self.marks.set_rank(payload.module, payload.rank)
            effect.changes = [change] if change else []
        elif kind == "theme":
            if self.ui.theme == payload.theme:
                return False
            self.ui.theme = payload.theme
            return True
        elif kind == "ui":
            return self._set_ui(payload.key, payload.value)
        elif kind in ("undo", "redo"):
            source, dest = (self.undo, self.redo) if kind == "undo" else (self.redo, self.undo)
            if not source:
                return False
            item = source.pop()
            if payload.target is not None and payload.target != item.seq:
                effect.warnings.append(f"{kind} entry {entry.seq} names edit {payload.target}, found {item.seq}")
            changes = [c.inverse() for c in reversed(item.changes)] if kind == "undo" else list(item.changes)
            for c in changes:
                self.marks.apply(c)
            dest.append(item)
            effect.changes = changes
            return True
        else:  # "create": the model reference, handled by the session
            return True
        if kind in PLAN_EDITS and effect.changes:
            self.undo.append(HistoryItem(seq=entry.seq, kind=kind, changes=effect.changes))
            del self.undo[:-HISTORY_LIMIT]
            self.redo.clear()  # a new edit forks history: what was undone can no longer be redone
        return bool(effect.changes)

    def _bulk(self, payload: BulkPayload, changes: list[Change]) -> None:
        """Apply a bulk edit, appending each change to `changes` as it happens (so a failure can be reverted)."""
        if payload.replace:
            changes.extend(self.marks.clear())
        for m in payload.marks:
            change = self.marks.mark(m, add=True)
            if change:
                changes.append(change)
        for module, rank in sorted(payload.ranks.items()):
            change = self.marks.set_rank(module, rank)
            if change:
                changes.append(change)

    def _set_ui(self, key: str, value) -> bool:
        if key in ("theme", "metric"):
            if getattr(self.ui, key) == value:
                return False
            setattr(self.ui, key, value)
        else:
            if key in self.ui.extra and self.ui.extra[key] == value:
                return False
            self.ui.extra[key] = value
        return True

    def revert(self, effect: Effect) -> None:
        """Take back an applied entry (used when its journal write failed)."""
        for c in reversed(effect.changes):
            self.marks.apply(c.inverse())
        self.undo, self.redo, self.ui = effect.undo, effect.redo, effect.ui
        self.seq, self.updated = effect.seq, effect.updated
