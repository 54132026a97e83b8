"""Checks on an edit before it is journaled: kinds, layers and indices against the session model's shapes.

Marking is free-form within range (marking head 0 and then head 2 passes through states that break the GQA rule);
whole-plan rules are `Session.validate`'s business. An edit refused here never reaches the journal.
"""

from __future__ import annotations

from collections.abc import Iterable

from sessions.model import LAYER_LEVEL, MARK_KINDS, PER_LAYER, MarkPayload
from surgery.errors import PlanError, UserError
from surgery.plan import LowRank, Plan
from surgery.shapes import ModelShape


def check_mark(shape: ModelShape | None, what: str, indices: Iterable[int], layer: int | None) -> MarkPayload:
    """Validate one mark; returns it with sorted, unique indices.

    Args:
        shape: The session model's shapes (None: range checks are skipped).
        what: One of `MARK_KINDS`.
        indices: Components (per-layer kinds) or layer indices (layers / attention / mlp).
        layer: The layer, for per-layer kinds only.

    Raises:
        UserError: Unknown kind, a missing or superfluous layer, no indices, or an index out of range.
    """
    if what not in MARK_KINDS:
        raise UserError(f"unknown mark kind {what!r}; expected one of: {', '.join(MARK_KINDS)}")
    if what in PER_LAYER and layer is None:
        raise UserError(f"marking {what} needs a layer")
    if what in LAYER_LEVEL and layer is not None:
        raise UserError(f"{what} marks take layer indices as `indices`, not a `layer`")
    idx = sorted({int(i) for i in indices})
    if not idx:
        raise UserError(f"no {what} given to mark")
    if idx[0] < 0 or (layer is not None and layer < 0):
        raise UserError(f"negative index in {what} marks")
    if shape is not None:
        n = shape.num_layers
        last_layer = idx[-1] if what in LAYER_LEVEL else layer
        if last_layer >= n:
            raise UserError(f"layer {last_layer} out of range (the model has {n} layers)")
        if what in PER_LAYER:
            s = shape.layers[layer]
            limit, noun = {"heads": (s.heads, "query head"), "kv_groups": (s.kv_heads, "KV group"),
                           "neurons": (s.mlp, "neuron")}[what]
            if idx[-1] >= limit:
                raise UserError(f"{noun} {idx[-1]} out of range (layer {layer} has {limit} {noun}s)")
    return MarkPayload(what=what, layer=layer, indices=idx)


def check_rank(shape: ModelShape | None, module: str, rank: int | None) -> None:
    """Validate a low-rank mark (rank None removes it) with the plan resolver's own rules.

    Raises:
        UserError: A rank below 1, a module that is not a decoder-layer Linear, or a rank above min(out, in).
    """
    if rank is not None and rank < 1:
        raise UserError(f"rank must be at least 1 (got {rank}); use rank None to remove the low-rank mark")
    if shape is None or rank is None:
        return
    from surgery.resolve import resolve_plan

    try:
        resolve_plan(Plan(steps=[LowRank(op="low_rank", module=module, rank=rank)]), shape)
    except PlanError as exc:
        raise UserError(exc.problems[0].removeprefix("steps[0].")) from None
