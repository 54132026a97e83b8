"""The plan under edit in the TUI: marks per original layer, validated on every change, with undo/redo.

Every change builds the candidate plan and runs `surgery.resolve.resolve_plan` on it before it counts: an illegal
mark (GQA rule, every head of a layer, ...) is refused with the resolver's reason and nothing changes. The editor is
UI-free (the app and tests drive it); a session, when one is open, receives every accepted plan through `on_commit`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from surgery.errors import PlanError
from surgery.plan import Plan, parse_plan
from surgery.resolve import Resolution, resolve_plan
from surgery.shapes import ModelShape


@dataclass
class LayerMarks:
    """What the user marked in one original layer."""

    heads: set[int] = field(default_factory=set)
    neurons: list[int] = field(default_factory=list)
    dropped: bool = False
    drop_attention: bool = False
    drop_mlp: bool = False
    ranks: dict[str, int] = field(default_factory=dict)  # layer-relative Linear path -> rank


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
        if plan is not None:
            self.load_plan(plan)
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
                steps.append({"op": "low_rank", "module": f"{spec.layers}.{i}.{rel}", "rank": rank})
        if dropped:
            steps.append({"op": "drop_layers", "layers": dropped})
        return parse_plan({"version": 1, "steps": steps})

    def load_plan(self, plan: Plan) -> None:
        """Replace the marks by those of `plan` (validated against the model first)."""
        resolution = resolve_plan(plan, self.shape)
        layers = []
        for cut in resolution.layers:
            layers.append(LayerMarks(set(cut.heads), sorted(cut.neurons), cut.dropped, cut.drop_attention,
                                     cut.drop_mlp, dict(cut.low_rank)))
        self.layers = layers
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
        self._require_live(layer)
        verb = "unmark" if head in self.layers[layer].heads else "mark"
        return self._change(f"toggle head {head} of layer {layer}",
                            lambda ls: ls[layer].heads.symmetric_difference_update({head}),
                            lambda session: getattr(session, verb)("heads", [head], layer))

    def toggle_group(self, layer: int, group: int) -> Resolution:
        """Mark (or unmark) a whole KV group: all of its query heads."""
        self._require_live(layer)
        g = self.shape.layers[layer].group_size
        members = set(range(group * g, (group + 1) * g))

        verb = "unmark" if members <= self.layers[layer].heads else "mark"

        def edit(ls: list[LayerMarks]) -> None:
            if verb == "unmark":
                ls[layer].heads -= members
            else:
                ls[layer].heads |= members

        return self._change(f"toggle KV group {group} of layer {layer}", edit,
                            lambda session: getattr(session, verb)("heads", sorted(members), layer))

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
        """Set (or clear, with None) the low-rank truncation of one Linear."""
        self._require_live(layer)

        def edit(ls: list[LayerMarks]) -> None:
            if rank is None:
                ls[layer].ranks.pop(rel, None)
            else:
                ls[layer].ranks[rel] = rank

        module = f"{self.shape.spec.layers}.{layer}.{rel}"
        return self._change(f"rank {rank} for layer {layer} {rel}", edit,
                            lambda session: session.set_rank(module, rank))

    def set_plan(self, plan: Plan, description: str = "load plan") -> Resolution:
        """Replace every mark by a plan's (e.g. a suggestion), as one undoable change."""
        resolution = resolve_plan(plan, self.shape)
        marks = [LayerMarks(set(c.heads), sorted(c.neurons), c.dropped, c.drop_attention, c.drop_mlp,
                            dict(c.low_rank)) for c in resolution.layers]
        return self._change(description, lambda ls: ls.__setitem__(slice(None), marks))

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
