"""The plan under edit in the TUI: marks per original layer, validated on every change, with undo/redo.

Every change builds the candidate plan and runs `surgery.resolve.resolve_plan` on it before it counts: an illegal
mark (GQA rule, every head of a layer, ...) is refused with the resolver's reason and nothing changes. The editor is
UI-free (the app and tests drive it); a session, when one is open, receives every accepted plan through `on_commit`.

Head marks on GQA models: one query head alone almost never keeps "the same number of heads in every kept KV
group", so a head set that breaks only that rule is held as a *pending selection* of its layer (`pending`): shown,
remembered in the session's UI state, but not in the plan. It becomes plan steps (one undoable edit) the moment it
is GQA-legal, e.g. after one head has been picked in every group.

Expert marks on MoE models go to the plan at once, layer by layer (MoE layers may keep different numbers of
experts: the output then loads with surgery.load). Residual channels (prune_hidden), experts, the reconstruct step and the calibration block are not marks a
session's journal can hold yet: with a session they are kept in its UI state (`PLAN_EXTRAS_KEY`), so they survive
`q`, but the session's undo does not reach them (without a session, undo covers them like every other edit).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from surgery.errors import PlanError
from sessions.extras import PLAN_EXTRAS_KEY, merge_plan_extras, split_plan
from surgery.plan import DATA_RANK_METHODS, Plan, parse_plan
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
    experts: set[int] = field(default_factory=set)  # removed experts of an MoE layer


def _data_rank(cut, rel: str) -> dict:
    """The method fields of a data-driven low_rank step ({"method": "asvd", "alpha": 0.5}), to write back as read."""
    alpha = cut.low_rank_alpha.get(rel)
    return {"method": cut.low_rank_method[rel], **({"alpha": alpha} if alpha is not None else {})}


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
        self.layers = [LayerMarks() for _ in shape.layers]
        self.hidden: list[int] = []  # removed residual-stream channels (one prune_hidden step)
        # ((layers, hidden, data_steps) before the change, whether the session journal got an entry for it)
        self._undo: list[tuple] = []
        self._redo: list[tuple] = []
        self.pending: dict[int, set[int]] = {}  # layer -> the head set being picked, not GQA-legal yet
        # a loaded plan's data-driven parts (calibration block, reconstruct step, whitened/asvd low_rank), which are not
        # marks: kept as they are and written back by plan(), so editing such a plan never drops them
        self.data_steps: dict = {}
        self.notices: list[str] = []  # for the UI to show once (e.g. session extras that no longer fit)
        if session is not None and plan is None:
            plan = self._with_extras(session.plan(), session.ui.extra.get(PLAN_EXTRAS_KEY))
        if plan is not None:
            self.load_plan(plan)
        if session is not None:
            self._restore_pending(session.ui.extra.get(PENDING_KEY))
        self.resolution = resolve_plan(self.plan(), shape)

    # ----------------------------------------------------------------------------------------- plan <-> marks
    def plan(self) -> Plan:
        """The marks as a plan (canonical order: per layer heads, neurons, experts, blocks; then drops; ranks;
        then the width cut and the reconstruct step)."""
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
            if m.experts and not m.drop_mlp:
                steps.append({"op": "prune_experts", "layer": i, "experts": sorted(m.experts)})
            if m.drop_attention:
                steps.append({"op": "drop_attention", "layer": i})
            if m.drop_mlp:
                steps.append({"op": "drop_mlp", "layer": i})
            for rel, rank in sorted(m.ranks.items()):
                step = {"op": "low_rank", "module": f"{spec.layers}.{i}.{rel}", "rank": rank}
                step.update(self.data_steps.get("data_ranks", {}).get((i, rel), {}))  # whitened / asvd (+ alpha)
                steps.append(step)
        if dropped:
            steps.append({"op": "drop_layers", "layers": dropped})
        if self.hidden:
            step = {"op": "prune_hidden", "channels": list(self.hidden)}
            if self.data_steps.get("rescale_norms") is False:
                step["rescale_norms"] = False
            steps.append(step)
        doc: dict = {"version": 1, "steps": steps}
        if self.data_steps.get("reconstruct") is not None:
            steps.append(self.data_steps["reconstruct"].model_dump(exclude_none=True))
        if self.data_steps.get("calibration") is not None:
            doc["calibration"] = self.data_steps["calibration"].model_dump(exclude_none=True)
        return parse_plan(doc)

    def plan_with_steps(self, steps: list[dict]) -> Plan:
        """The plan under edit with other `steps` (dicts), its calibration block kept (e.g. one op removed)."""
        doc: dict = {"version": 1, "steps": steps}
        if self.data_steps.get("calibration") is not None:
            doc["calibration"] = self.data_steps["calibration"].model_dump(exclude_none=True)
        return parse_plan(doc)

    @staticmethod
    def _data_steps_of(plan: Plan, resolution: Resolution) -> dict:
        return {
            "calibration": plan.calibration,
            "reconstruct": resolution.reconstruct,
            "data_ranks": {(c.index, rel): _data_rank(c, rel) for c in resolution.layers
                           for rel, m in c.low_rank_method.items() if m in DATA_RANK_METHODS},
            "rescale_norms": resolution.rescale_norms,
        }

    @staticmethod
    def _marks_of(resolution: Resolution) -> list[LayerMarks]:
        return [LayerMarks(set(c.heads), sorted(c.neurons), c.dropped, c.drop_attention, c.drop_mlp,
                           dict(c.low_rank), set(c.experts)) for c in resolution.layers]

    def load_plan(self, plan: Plan) -> None:
        """Replace the marks by those of `plan` (validated against the model first)."""
        resolution = resolve_plan(plan, self.shape)
        self.layers = self._marks_of(resolution)
        self.hidden = list(resolution.hidden_removed)
        self.data_steps = self._data_steps_of(plan, resolution)
        self.resolution = resolution

    # ------------------------------------------------------------------------- what a session cannot hold yet
    def _with_extras(self, plan: Plan | None, text) -> Plan | None:
        """A session's marks plus the extras kept in its UI state; the marks alone when the two do not fit."""
        if plan is None or not text:
            return plan
        try:
            merged = merge_plan_extras(plan, text)
            resolve_plan(merged, self.shape)
        except (ValueError, TypeError, AttributeError, KeyError, PlanError) as exc:
            reason = exc.problems[0] if isinstance(exc, PlanError) else type(exc).__name__
            self.notices.append(f"the session's width / expert / reconstruct steps were left out: {reason}")
            return plan
        return merged

    def _journal(self, description: str, before: Plan, forward: Callable[[object], object] | None) -> bool:
        """Hand an accepted change to the session: marks to its journal, the extras to its UI state. Returns
        whether the journal got an (undoable) entry."""
        after = self.plan()
        (marks_before, extra_before), (marks_after, extra_after) = split_plan(before), split_plan(after)
        journaled = forward is not None or marks_after.to_json() != marks_before.to_json()
        if forward is not None:
            forward(self.session)
        elif journaled:
            self.session.load_plan(marks_after, note=description)
        if extra_after != extra_before:
            self.session.set_ui(PLAN_EXTRAS_KEY, extra_after or None)
        return journaled

    def _save_extras(self) -> None:
        if self.session is not None:
            self.session.set_ui(PLAN_EXTRAS_KEY, split_plan(self.plan())[1] or None)

    # ----------------------------------------------------------------------------------------------- edits
    def _state(self) -> tuple:
        return copy.deepcopy((self.layers, self.hidden, self.data_steps))

    def _change(self, description: str, edit: Callable[[list[LayerMarks]], None],
                forward: Callable[[object], object] | None = None, *, hidden: list[int] | None = None,
                data_steps: dict | None = None) -> Resolution:
        """Apply `edit` to a copy (and the new `hidden` channels / `data_steps`, when given); keep it only if the plan
        stays valid (PlanError otherwise, nothing changed) and, with a session, only once the session has it on
        disk (`forward`; default: the marks as one edit, the extras in its UI state)."""
        candidate = copy.deepcopy(self.layers)
        edit(candidate)
        before = self.plan()
        previous = self._state()
        self.layers = candidate
        if hidden is not None:
            self.hidden = sorted(set(hidden))
        if data_steps is not None:
            self.data_steps = data_steps
        try:
            resolution = resolve_plan(self.plan(), self.shape)
            journaled = self._journal(description, before, forward) if self.session is not None else False
        except Exception:
            self.layers, self.hidden, self.data_steps = previous
            raise
        self._undo.append((previous, journaled))
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
        """Replace every mark by a plan's (e.g. a suggestion), its width cut, experts, calibration block and
        reconstruct step included, as one undoable change."""
        resolution = resolve_plan(plan, self.shape)
        marks = self._marks_of(resolution)
        resolution = self._change(description, lambda ls: ls.__setitem__(slice(None), marks),
                                  hidden=list(resolution.hidden_removed),
                                  data_steps=self._data_steps_of(plan, resolution))
        self._set_pending({})  # a whole new plan: a half-picked selection no longer means anything
        return resolution

    # ------------------------------------------------------------------------------------ width and experts
    def set_hidden(self, channels: list[int], description: str | None = None) -> Resolution:
        """Make `channels` (original residual-stream indices) the plan's one prune_hidden step (empty: none)."""
        return self._change(description or f"cut {len(channels)} residual channels", lambda ls: None,
                            hidden=list(channels))

    def experts_shown(self, layer: int) -> set[int]:
        """The layer's removed experts (in the plan)."""
        return set(self.layers[layer].experts)

    def set_experts(self, layer: int, experts: set[int], description: str | None = None) -> Resolution:
        """Make `experts` the layer's removed experts; a problem (fewer than top-k, a dense layer) is refused with
        the resolver's reason."""
        self._require_live(layer)

        def edit(ls: list[LayerMarks]) -> None:
            ls[layer].experts = set(experts)

        return self._change(description or f"experts {sorted(experts)} of layer {layer}", edit)

    def toggle_expert(self, layer: int, expert: int) -> Resolution:
        verb = "unmark" if expert in self.experts_shown(layer) else "mark"
        return self.set_experts(layer, self.experts_shown(layer) ^ {expert}, f"{verb} expert {expert} of layer {layer}")

    def set_reconstruct(self, calibrated: Plan, description: str = "add reconstruct step") -> Resolution:
        """Take a calibrated copy of the plan under edit (surgery.reconstruct.calibrate_plan): its calibration
        block and reconstruct step, with the marks as they are now."""
        resolution = resolve_plan(calibrated, self.shape)
        data = {**self.data_steps, "calibration": calibrated.calibration, "reconstruct": resolution.reconstruct}
        return self._change(description, lambda ls: None, data_steps=data)

    def _from_session(self, entry) -> bool:
        if entry is None:
            return False
        self.load_plan(self._with_extras(self.session.plan(), split_plan(self.plan())[1]))
        self._commit("undo" if entry.kind == "undo" else "redo")
        return True

    def _step(self, back: list[tuple], forth: list[tuple], kind: str) -> bool:
        """Undo (or redo) the newest change. With a session, a change its journal holds goes through the
        journal (so undo crosses restarts); an extras-only change (width, experts, reconstruct) comes from
        this editor's own history."""
        if self.session is not None and (not back or back[-1][1]):
            if back:
                _, journaled = back.pop()
                forth.append((self._state(), journaled))
            return self._from_session(getattr(self.session, kind)())
        if not back:
            return False
        state, journaled = back.pop()
        forth.append((self._state(), journaled))
        self.layers, self.hidden, self.data_steps = state
        self.resolution = resolve_plan(self.plan(), self.shape)
        self._save_extras()
        self._commit(kind)
        return True

    def undo(self) -> bool:
        return self._step(self._undo, self._redo, "undo")

    def redo(self) -> bool:
        return self._step(self._redo, self._undo, "redo")

    @property
    def mark_count(self) -> int:
        return len(self.plan().steps)
