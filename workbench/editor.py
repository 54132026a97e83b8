"""The plan under edit in the TUI: marks per original layer, validated on every change, with undo/redo.

Every change builds the candidate plan and runs `surgery.resolve.resolve_plan` on it before it counts: an illegal
mark (GQA rule, every head of a layer, ...) is refused with the resolver's reason and nothing changes. The editor is
UI-free (the app and tests drive it); a session, when one is open, receives every accepted plan through `on_commit`.

Head marks on GQA models: one query head alone almost never keeps "the same number of heads in every kept KV
group", so a head set that breaks only that rule is held as a *pending selection* of its layer (`pending`): shown,
remembered in the session's UI state, but not in the plan. It becomes plan steps (one undoable edit) the moment it
is GQA-legal, e.g. after one head has been picked in every group.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from surgery.errors import PlanError
from surgery.plan import Plan, parse_plan
from surgery.resolve import Resolution, resolve_plan
from surgery.shapes import LayerShape, ModelShape

PENDING_KEY = "pending_heads"  # session UI state: {layer: [heads]} as JSON, so a pending selection survives `q`


def gqa_shortfall(shape: LayerShape, heads: set[int]) -> dict[int, int] | None:
    """What a head set still needs to be GQA-legal: {KV group: heads still to mark}; None when it already is (or
    breaks another rule, e.g. every head, which the resolver reports).

    Groups whose every head is marked go away whole; every other group must lose the same number of heads, so
    the groups that lost fewer than the most-cut live group need that many more.
    """
    g, kv = shape.group_size, shape.kv_heads
    if not g or not kv:
        return None
    counts = [len(heads & set(range(k * g, (k + 1) * g))) for k in range(kv)]
    live = [c for c in counts if c < g]
    if not live or len(set(live)) == 1:
        return None
    most = max(live)
    return {k: most - c for k, c in enumerate(counts) if c < most}


def describe_shortfall(layer: int, heads: set[int], need: dict[int, int]) -> str:
    """One line: what is pending and what the GQA rule still asks for."""
    asks = ", ".join(f"{n} in group {k}" for k, n in sorted(need.items()))
    return (f"layer {layer}: heads {', '.join(map(str, sorted(heads)))} pending (GQA: every kept KV group must lose "
            f"the same number of heads): mark {asks}, or unmark")


@dataclass
class LayerMarks:
    """What the user marked in one original layer."""

    heads: set[int] = field(default_factory=set)
    neurons: list[int] = field(default_factory=list)
    dropped: bool = False
    drop_attention: bool = False
    drop_mlp: bool = False
    ranks: dict[str, int] = field(default_factory=dict)  # layer-relative Linear path -> rank


def useful_rank(out_f: int, in_f: int) -> int:
    """The largest rank whose two factors hold fewer parameters than the (out x in) matrix."""
    return (out_f * in_f - 1) // (out_f + in_f)


class PlanEditor:
    """Marks -> Plan, validated at every step.

    Args:
        shape: the model's shapes (from its config).
        plan: a plan to start from (e.g. restored from a session).
        on_commit: called with (description, plan) after every accepted change, undo and redo included.
    """

    def __init__(self, shape: ModelShape, plan: Plan | None = None,
                 on_commit: Callable[[str, Plan], None] | None = None, session=None) -> None:
        self.shape = shape
        self.on_commit = on_commit
        # a sessions.Session: every accepted change is journaled there (fsync) before it counts, and undo/redo
        # go through its journal, so they survive restarts
        self.session = session
        if session is not None and plan is None:
            plan = session.plan()
        self.layers = [LayerMarks() for _ in shape.layers]
        self._undo: list[list[LayerMarks]] = []
        self._redo: list[list[LayerMarks]] = []
        self.pending: dict[int, set[int]] = {}  # layer -> the head set being picked, not GQA-legal yet
        # a loaded plan's data-driven parts (calibration block, reconstruct step, whitened low_rank), which are not
        # marks: kept as they are and written back by plan(), so editing such a plan never drops them
        self.data_steps: dict = {}
        if plan is not None:
            self.load_plan(plan)
        if session is not None:
            self._restore_pending(session.ui.extra.get(PENDING_KEY))
        self.resolution = resolve_plan(self.plan(), shape)

    # ----------------------------------------------------------------------------------------- plan <-> marks
    def plan(self) -> Plan:
        """The marks as a plan (canonical order: per layer heads, neurons, blocks; then drops; then ranks)."""
        spec = self.shape.spec
        steps: list[dict] = []
        dropped = [i for i, m in enumerate(self.layers) if m.dropped]
        for i, m in enumerate(self.layers):
            if m.dropped:
                continue
            if m.heads and not m.drop_attention:
                steps.append({"op": "prune_heads", "layer": i, "heads": sorted(m.heads)})
            if m.neurons and not m.drop_mlp:
                steps.append({"op": "prune_neurons", "layer": i, "neurons": sorted(m.neurons)})
            if m.drop_attention:
                steps.append({"op": "drop_attention", "layer": i})
            if m.drop_mlp:
                steps.append({"op": "drop_mlp", "layer": i})
            for rel, rank in sorted(m.ranks.items()):
                step = {"op": "low_rank", "module": f"{spec.layers}.{i}.{rel}", "rank": rank}
                if (i, rel) in self.data_steps.get("whitened", ()):
                    step["method"] = "whitened"
                steps.append(step)
        if dropped:
            steps.append({"op": "drop_layers", "layers": dropped})
        doc: dict = {"version": 1, "steps": steps}
        if self.data_steps.get("reconstruct") is not None:
            steps.append(self.data_steps["reconstruct"].model_dump(exclude_none=True))
        if self.data_steps.get("calibration") is not None:
            doc["calibration"] = self.data_steps["calibration"].model_dump(exclude_none=True)
        return parse_plan(doc)

    def load_plan(self, plan: Plan) -> None:
        """Replace the marks by those of `plan` (validated against the model first)."""
        resolution = resolve_plan(plan, self.shape)
        layers = []
        for cut in resolution.layers:
            layers.append(LayerMarks(set(cut.heads), sorted(cut.neurons), cut.dropped, cut.drop_attention,
                                     cut.drop_mlp, dict(cut.low_rank)))
        self.layers = layers
        self.data_steps = {
            "calibration": plan.calibration,
            "reconstruct": resolution.reconstruct,
            "whitened": {(c.index, rel) for c in resolution.layers for rel, m in c.low_rank_method.items()
                         if m == "whitened"},
        }
        self.resolution = resolution

    # ----------------------------------------------------------------------------------------------- edits
    def _change(self, description: str, edit: Callable[[list[LayerMarks]], None],
                forward: Callable[[object], object] | None = None) -> Resolution:
        """Apply `edit` to a copy; keep it only if the plan stays valid (PlanError otherwise, nothing changed) and,
        with a session, only once the session has it on disk (`forward`; default: the whole plan as one edit)."""
        candidate = copy.deepcopy(self.layers)
        edit(candidate)
        previous, self.layers = self.layers, candidate
        try:
            resolution = resolve_plan(self.plan(), self.shape)
            if self.session is not None:
                (forward or (lambda session: session.load_plan(self.plan(), note=description)))(self.session)
        except Exception:
            self.layers = previous
            raise
        self._undo.append(previous)
        self._redo.clear()
        self.resolution = resolution
        self._commit(description)
        return resolution

    def _commit(self, description: str) -> None:
        if self.on_commit:
            self.on_commit(description, self.plan())

    def _require_live(self, layer: int) -> None:
        """Marks inside a dropped layer would be invisible in the plan: refuse them with the reason."""
        if self.layers[layer].dropped:
            raise PlanError([f"layer {layer}: is dropped; unmark the layer first"])

    def toggle_head(self, layer: int, head: int) -> Resolution:
        """Mark or unmark one query head; a GQA-illegal result is held as the layer's pending selection."""
        self._require_live(layer)
        verb = "unmark" if head in self.heads_shown(layer) else "mark"
        return self.set_heads(layer, self.heads_shown(layer) ^ {head}, f"{verb} head {head} of layer {layer}")

    def toggle_group(self, layer: int, group: int) -> Resolution:
        """Mark (or unmark) a whole KV group: all of its query heads."""
        self._require_live(layer)
        g = self.shape.layers[layer].group_size
        members = set(range(group * g, (group + 1) * g))
        current = self.heads_shown(layer)
        verb = "unmark" if members <= current else "mark"
        heads = current - members if verb == "unmark" else current | members
        return self.set_heads(layer, heads, f"{verb} KV group {group} of layer {layer}")

    def heads_shown(self, layer: int) -> set[int]:
        """The layer's heads as the user sees them: the pending selection if there is one, else the plan's."""
        return set(self.pending.get(layer, self.layers[layer].heads))

    def pending_note(self, layer: int) -> str | None:
        """What the layer's pending selection still needs (None: nothing pending)."""
        if layer not in self.pending:
            return None
        heads = self.pending[layer]
        return describe_shortfall(layer, heads, gqa_shortfall(self.shape.layers[layer], heads) or {})

    def set_heads(self, layer: int, heads: set[int], description: str) -> Resolution:
        """Make `heads` the layer's removed heads: in the plan (one edit) when GQA-legal, else pending."""
        self._require_live(layer)
        heads = set(heads)
        if gqa_shortfall(self.shape.layers[layer], heads) is not None:
            self._set_pending({**self.pending, layer: heads})
            return self.resolution
        rest = {k: v for k, v in self.pending.items() if k != layer}
        if heads == self.layers[layer].heads:  # back to what the plan has: only the pending selection goes
            self._set_pending(rest)
            return self.resolution
        resolution = self._change(description, lambda ls: setattr(ls[layer], "heads", heads))
        self._set_pending(rest)
        return resolution

    def _set_pending(self, pending: dict[int, set[int]]) -> None:
        if pending == self.pending:
            return
        if self.session is not None:  # remembered like the theme: UI state, not an undoable plan edit
            self.session.set_ui(PENDING_KEY, json.dumps({str(k): sorted(v) for k, v in sorted(pending.items())}))
        self.pending = pending

    def _restore_pending(self, text) -> None:
        try:
            saved = {int(k): set(v) for k, v in json.loads(text or "{}").items()}
        except (ValueError, TypeError, AttributeError):
            return
        self.pending = {layer: heads for layer, heads in saved.items()
                        if 0 <= layer < len(self.layers) and not self.layers[layer].dropped
                        and gqa_shortfall(self.shape.layers[layer], heads) is not None}

    def toggle_layer(self, layer: int) -> Resolution:
        verb = "unmark" if self.layers[layer].dropped else "mark"
        return self._change(f"toggle layer {layer}", lambda ls: setattr(ls[layer], "dropped", not ls[layer].dropped),
                            lambda session: getattr(session, verb)("layers", [layer]))

    def toggle_attention(self, layer: int) -> Resolution:
        self._require_live(layer)
        verb = "unmark" if self.layers[layer].drop_attention else "mark"
        return self._change(f"toggle attention of layer {layer}",
                            lambda ls: setattr(ls[layer], "drop_attention", not ls[layer].drop_attention),
                            lambda session: getattr(session, verb)("attention", [layer]))

    def toggle_mlp(self, layer: int) -> Resolution:
        self._require_live(layer)
        verb = "unmark" if self.layers[layer].drop_mlp else "mark"
        return self._change(f"toggle MLP of layer {layer}",
                            lambda ls: setattr(ls[layer], "drop_mlp", not ls[layer].drop_mlp),
                            lambda session: getattr(session, verb)("mlp", [layer]))

    def set_neurons(self, layer: int, neurons: list[int]) -> Resolution:
        """Set the removed neurons of a layer (e.g. the lowest-scored N)."""
        self._require_live(layer)
        return self._change(f"cut {len(neurons)} neurons of layer {layer}",
                            lambda ls: setattr(ls[layer], "neurons", sorted(set(neurons))))

    def set_rank(self, layer: int, rel: str, rank: int | None) -> Resolution:
        """Set (or clear, with None) the low-rank truncation of one Linear; a rank at or past the break-even rank
        (factors at least as big as the dense matrix) is refused."""
        self._require_live(layer)
        if rank is not None:
            out_f, in_f = self.linear_shape(layer, rel)
            if rank * (out_f + in_f) >= out_f * in_f:
                raise PlanError([f"layer {layer}: {rel} rank {rank} is past its break-even rank "
                                 f"{useful_rank(out_f, in_f)} ({out_f} x {in_f}): the two factors would hold more "
                                 "parameters than the matrix"])

        def edit(ls: list[LayerMarks]) -> None:
            if rank is None:
                ls[layer].ranks.pop(rel, None)
            else:
                ls[layer].ranks[rel] = rank

        module = f"{self.shape.spec.layers}.{layer}.{rel}"
        return self._change(f"rank {rank} for layer {layer} {rel}", edit,
                            lambda session: session.set_rank(module, rank))

    def linear_shape(self, layer: int, rel: str) -> tuple[int, int]:
        """(out, in) of a layer-relative Linear after the plan's structural cuts."""
        from surgery.resolve import linear_dims

        block, name = rel.split(".")
        kind = "attn" if block == self.shape.spec.attn else "mlp"
        return linear_dims(self.resolution.layers[layer], kind, name, self.shape)

    def set_plan(self, plan: Plan, description: str = "load plan") -> Resolution:
        """Replace every mark by a plan's (e.g. a suggestion), as one undoable change."""
        resolution = resolve_plan(plan, self.shape)
        marks = [LayerMarks(set(c.heads), sorted(c.neurons), c.dropped, c.drop_attention, c.drop_mlp,
                            dict(c.low_rank)) for c in resolution.layers]
        resolution = self._change(description, lambda ls: ls.__setitem__(slice(None), marks))
        self._set_pending({})  # a whole new plan: a half-picked selection no longer means anything
        return resolution

    def _from_session(self, entry) -> bool:
        if entry is None:
            return False
        self.load_plan(self.session.plan())
        self._commit("undo" if entry.kind == "undo" else "redo")
        return True

    def undo(self) -> bool:
        if self.session is not None:
            return self._from_session(self.session.undo())
        if not self._undo:
            return False
        self._redo.append(self.layers)
        self.layers = self._undo.pop()
        self.resolution = resolve_plan(self.plan(), self.shape)
        self._commit("undo")
        return True

    def redo(self) -> bool:
        if self.session is not None:
            return self._from_session(self.session.redo())
        if not self._redo:
            return False
        self._undo.append(self.layers)
        self.layers = self._redo.pop()
        self.resolution = resolve_plan(self.plan(), self.shape)
        self._commit("redo")
        return True

    @property
    def mark_count(self) -> int:
        return len(self.plan().steps)
