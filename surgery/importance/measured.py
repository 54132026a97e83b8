"""`plan suggest --axes ... --data FILE`: the parameter target shared across axes on measured loss curves.

Why not the gate scores alone: a first-order (Taylor) gate estimate of removing a whole layer or residual channel is
far from the real loss change (on the demo at 80% the gate-priced mix spent 21.2M of 26.9M parameters on 6 layers
and was 6.6x worse than heads+neurons alone: docs/benchmarks.md, "Width, depth and the mix at 80%"). Here each axis
is priced by what its cuts actually cost:

1. units: every axis asked for is one unit, except heads and neurons together, which are one unit cut the way
   `plan suggest` cuts them without --axes (attention and MLP giving up the same fraction, hull-allocated per layer
   with --non-uniform); each unit ranks by its own best score: layers by layer-bi, hidden by channel-norm, experts
   by REAP (magnitudes are fine here, the loss is measured), heads / neurons by the allocator's defaults;
2. curves: per unit, its single-axis plan (`suggest_plan` for that unit alone) removing a fraction k of the goal for
   a few k, each applied to a copy of the model and its mean next-token loss measured on the calibration batches:
   the unit's loss increase against parameters removed (exact counts);
3. allocation: the lower convex hull of every curve, hull segments across units taken in order of measured loss
   per parameter until the goal is reached (the last one partly: a unit can be cut to any amount); the curves'
   interaction (a removed channel also shrinks every head and neuron; a dropped layer takes its heads along) is
   ignored here and
4. made exact: each chosen unit's plan at its amount, steps in dropped layers left out, the finest chosen unit
   re-sized until the whole plan's exact count is within one of its steps of the target;
5. checked: one more calibration forward of the mix against the best single-axis plan at the whole target (the
   curves' last points, when within 2% of the parameters of the target: see SINGLE_SLACK); whichever has the lower
   loss is returned, and the summary says which and why.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence

import torch

from surgery.errors import UserError
from surgery.importance.hull import hull_segments, lower_hull
from surgery.importance.scorefile import ScoreFile

POINTS = (0.125, 0.25, 0.5, 0.75, 1.0)  # fractions of the goal at which each unit's loss is measured
# per axis, the ranking its single-axis plans use, best first (measured on the demo: docs/benchmarks.md)
RANKING = {
    "layers": ("layer_bi", "layer_ablate", "layer_grad"),
    "hidden": ("channel_norm", "channel_taylor"),
    "experts": ("expert_reap", "expert_grad", "expert_freq"),
}
_METHOD = {"layers": "layer-bi", "hidden": "channel-norm", "experts": "expert-reap"}
# which unit fills the target exactly: the finest steps first
_FINEST = ("heads+neurons", "neurons", "hidden", "experts", "heads", "layers")


# a single-axis plan competes with the mix only this close to the target (fraction of all parameters): a coarse
# axis (one layer of a 2-layer model) is within its own step of any target but is not the size that was asked for
SINGLE_SLACK = 0.02


def meets_target(s) -> bool:
    """A single-axis Suggestion is a fair rival of the mix: within its step and SINGLE_SLACK of the target."""
    off = abs(s.params_after - s.target_params)
    return off <= max(s.granularity, 1) and off <= SINGLE_SLACK * s.params_before


def units_of(axes: Sequence[str]) -> list[str]:
    """("heads", "neurons", "layers") -> ["heads+neurons", "layers"]: heads and neurons together are one unit."""
    both = "heads" in axes and "neurons" in axes
    out = []
    for a in axes:
        if both and a in ("heads", "neurons"):
            if "heads+neurons" not in out:
                out.append("heads+neurons")
        else:
            out.append(a)
    return out


def allocate_on_curves(curves: dict[str, list[tuple[float, float]]], goal: float) -> dict[str, float]:
    """Parameters per unit summing to `goal` at the lowest loss the curves predict (interaction ignored).

    Each curve is [(parameters removed, loss increase), ...] with (0, 0). On its lower convex hull the predicted
    loss is convex and piecewise linear, so taking hull segments of all units in order of slope (the last one in
    part) is optimal for the hulls. Raises UserError when even every curve's last point falls short of `goal`.
    """
    units = list(curves)
    _, segments = hull_segments([curves[u] for u in units])
    amounts, left = {u: 0.0 for u in curves}, float(goal)
    for _, g, _, _, d in segments:
        if left <= 0:
            break
        take = min(d, left)
        amounts[units[g]] += take
        left -= take
    if left > 1e-6 * max(goal, 1):
        most = sum(max(a for a, _ in pts) for pts in curves.values())
        raise UserError(f"the axes can remove {most:,.0f} parameters at most by their measured cuts, short of the "
                        f"{goal:,.0f} the target needs: add axes or raise --target-params")
    return amounts


def interpolate(pts: list[tuple[float, float]], x: float) -> float:
    """The measured curve (piecewise linear through its points, sorted by amount) at `x`."""
    pts = sorted(pts)
    for (a1, c1), (a2, c2) in zip(pts, pts[1:]):
        if a1 <= x <= a2:
            return c1 if a2 == a1 else c1 + (c2 - c1) * (x - a1) / (a2 - a1)
    return pts[-1][1] if x > pts[-1][0] else pts[0][1]


def calibration_loss(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Mean next-token cross-entropy over the calibration batches (nats)."""
    from surgery.importance.ablate import batch_loss_sum

    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            total += float(batch_loss_sum(model, ids.to(device)))
            count += ids.shape[0] * (ids.shape[1] - 1)
    return total / count


def _dump(suggestion) -> list[dict]:
    return [s.model_dump(exclude_none=True) for s in suggestion.plan.steps]


def dropped_layers(parts: dict[str, object]) -> set[int]:
    """The layers the drop_layers steps of the units' plans remove."""
    return {i for s in parts.values() for st in s.plan.steps if st.op == "drop_layers" for i in st.layers}


def outside(steps: list[dict], dropped: set[int]) -> list[dict]:
    """`steps` (dumped) without the cuts inside `dropped` layers (the layer goes anyway); drop_layers stay."""
    return [st for st in steps if st["op"] == "drop_layers" or st.get("layer") not in dropped]


class MeasuredAxes:
    """Steps 1-5 of the module docstring for one model, its calibration batches and its scores."""

    def __init__(self, model, batches, scores: Sequence[ScoreFile], config_dict: dict, target, *, uniform: bool,
                 metrics: dict | None, force: bool, points: Sequence[float], progress, cancel):
        from surgery.importance.axes import params_removed
        from surgery.shapes import shape_from_config
        from surgery.suggest import merge_scores

        self.model, self.batches, self.files = model, list(batches), list(scores)
        self.scores = merge_scores(self.files, force)
        self.config_dict, self.target, self.uniform, self.force = config_dict, target, uniform, force
        self.wanted = {k: v for k, v in (metrics or {}).items() if v}
        self.points = tuple(sorted({*points, 1.0}))  # the last point is the unit alone at the whole target
        self.progress, self.cancel = progress, cancel
        shape = shape_from_config(config_dict)
        self.removed = lambda steps: params_removed(config_dict, shape, steps)
        self.evaluations = 0

    # -- one unit alone ----------------------------------------------------------------------------------------
    def _unit_metrics(self, unit: str) -> dict:
        """The metrics a unit's single-axis plans rank by: the user's, else its own best ranking present."""
        if unit not in RANKING:  # heads / neurons: the allocators' own defaults, or what the user named
            return {k: v for k, v in self.wanted.items() if k in ("heads", "neurons", "kv")}
        if unit in self.wanted:
            return {unit: self.wanted[unit]}
        have = self.scores.metrics()
        metric = next((m for m in RANKING[unit] if m in have), None)
        if metric is None:
            raise UserError(f"the scores have no {unit} ranking ({', '.join(RANKING[unit])}): score with --method "
                            f"{_METHOD[unit]}")
        return {unit: metric}

    def unit_plan(self, unit: str, removed: float):
        """The Suggestion cutting `unit` alone by about `removed` parameters (UserError when it cannot)."""
        from surgery.suggest import Target, suggest_plan

        kept = 1 - removed / self.total
        axes = None if unit == "heads+neurons" else (unit,)
        return suggest_plan(self.scores, self.config_dict, Target(params=kept, axes=axes), uniform=self.uniform,
                            metrics=self._unit_metrics(unit), force=self.force)

    def loss_of(self, steps: list[dict], what: str) -> float:
        """Calibration loss of the model with `steps` applied (to a copy: the model stays as it is)."""
        from surgery.apply import apply_plan
        from surgery.importance.runner import check_cancel
        from surgery.plan import parse_plan

        check_cancel(self.cancel, "plan suggest")
        self.evaluations += 1
        if self.progress:
            self.progress(f"measuring the calibration loss of {what} ({self.evaluations})")
        if not steps:
            return calibration_loss(self.model, self.batches)
        cut, _ = apply_plan(copy.deepcopy(self.model), parse_plan({"version": 1, "steps": steps}))
        loss = calibration_loss(cut, self.batches)
        del cut
        return loss

    def curve(self, unit: str) -> list[tuple[float, float]]:
        """[(exact parameters removed, loss increase)] from (0, 0); self.full[unit]: (the Suggestion cutting the
        unit alone by the whole goal, its loss increase) when it can."""
        pts = [(0.0, 0.0)]
        for k in self.points:
            try:
                s = self.unit_plan(unit, k * self.goal)
            except UserError:
                if len(pts) == 1:
                    raise
                break  # the unit cannot cut this much: its curve ends at the last reachable point
            self.used.setdefault(unit, s.plan.provenance["metrics"])
            amount = float(s.params_before - s.params_after)
            if amount > pts[-1][0]:  # coarse steps give the point before again: measured once
                pts.append((amount, self.loss_of(_dump(s), f"{unit} at {k:.0%} of the cut") - self.base))
            if k == 1.0 and meets_target(s):
                self.full[unit] = (s, pts[-1][1])
        return pts

    # -- the mix -----------------------------------------------------------------------------------------------
    def combine(self, parts: dict[str, object]) -> list[dict]:
        """The units' steps together; cuts inside dropped layers are left out (the layer goes anyway)."""
        dropped = dropped_layers(parts)
        return [st for s in parts.values() for st in outside(_dump(s), dropped)]

    def fill(self, fixed: dict[str, object], filler: str, start: float):
        """Re-size `filler` until the whole plan removes the goal within one filler step: (parts, removed)."""
        best, x = None, start
        for _ in range(12):
            try:
                s = self.unit_plan(filler, x) if x > 0 else None
            except UserError:
                break  # past what the filler can cut
            parts = {**fixed, **({filler: s} if s is not None else {})}
            got = self.removed(self.combine(parts))
            step = s.granularity if s is not None else 0
            if best is None or abs(got - self.goal) < abs(best[1] - self.goal):
                best = (parts, got, step)
            if abs(got - self.goal) <= max(step, 1) or (s is None and got >= self.goal):
                break
            x += self.goal - got  # a unit's own amount moves the whole plan's count at about the same rate
        return best

    def run(self):
        from surgery.estimate import count_params, meta_model

        t = self.target
        self.total = count_params(meta_model(self.config_dict))
        self.goal = self.total * (1 - t.params)
        self.full: dict[str, tuple] = {}
        self.used: dict[str, dict] = {}  # per unit, the metrics its plans ranked by
        units = units_of(t.axes)
        self.base = self.loss_of([], "the unpruned model")
        curves = {unit: self.curve(unit) for unit in units}
        amounts = allocate_on_curves(curves, self.goal)
        chosen = [u for u in units if amounts[u] > 0]
        filler = next(u for u in _FINEST if u in chosen)
        fixed = {u: self.unit_plan(u, amounts[u]) for u in chosen if u != filler}
        best = self.fill(fixed, filler, amounts[filler])
        mix_ok = best is not None and abs(best[1] - self.goal) <= max(best[2], 1)
        mix_loss = None
        if mix_ok:
            steps = self.combine(best[0])
            same = next((u for u, (s, _) in self.full.items() if _dump(s) == steps), None)
            mix_loss = self.full[same][1] if same else self.loss_of(steps, "the mix") - self.base
        best_single = min(self.full, key=lambda u: self.full[u][1]) if self.full else None
        single_loss = self.full[best_single][1] if best_single else None
        if best_single is not None and (not mix_ok or mix_loss > single_loss):
            s = self.full[best_single][0]
            kept, parts, granularity, steps = best_single, {best_single: s}, s.granularity, _dump(s)
        elif mix_ok:
            kept, parts, granularity = "mix", best[0], best[2]
        else:
            raise UserError(f"--axes {','.join(t.axes)}: no axis meets --target-params {t.params} alone and the mix "
                            "misses it; add axes or raise the target")
        report = {"base_loss": round(self.base, 6), "tokens": sum(b.numel() for b in self.batches), "kept": kept,
                  "mix_loss": None if mix_loss is None else round(mix_loss, 6), "best_single": best_single,
                  "best_single_loss": None if single_loss is None else round(single_loss, 6),
                  "evaluations": self.evaluations,
                  "units": self._describe(units, curves, amounts, parts, filler)}
        return steps, parts, granularity, report

    def _describe(self, units, curves, amounts, parts, filler) -> dict:
        """Per unit: its metric, the parameters its own steps remove in the result (exact), the loss its curve
        measured at that amount, the curve, and the measured loss per 1M parameters of its cheapest hull step."""
        out = {}
        dropped = dropped_layers(parts)
        for u in units:
            s = parts.get(u)
            own = outside(_dump(s), dropped) if s else []
            params = self.removed(own) if own else 0
            pts = curves[u]
            hull = lower_hull(pts)
            first = ((pts[hull[1]][1] / pts[hull[1]][0]) * 1e6) if len(hull) > 1 else None
            out[u] = {"metric": ",".join(self.used[u].values()),
                      "params": params, "loss": round(interpolate(pts, params), 6),
                      "allocated": round(amounts.get(u, 0.0)), "curve": [[round(a), round(c, 6)] for a, c in pts],
                      "cheapest_loss_per_m_params": round(first, 6) if first is not None else None,
                      "fills": u == filler and u in parts}
        return out


def merged_summary(parts: dict[str, object]) -> dict:
    """The per-layer counts of the units' summaries, without what dropped layers took along."""
    dropped = sorted({i for s in parts.values() for i in s.summary.get("layers_dropped", [])})
    out = {"layers_dropped": dropped}
    for key in ("heads_removed", "kv_groups_removed", "neurons_removed", "experts_removed"):
        out[key] = {i: n for s in parts.values() for i, n in s.summary.get(key, {}).items() if i not in dropped}
    out["hidden_removed"] = sum(s.summary.get("hidden_removed", 0) for s in parts.values())
    return out


def suggest_measured(
    model: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    scores: ScoreFile | Sequence[ScoreFile],
    config_dict: dict,
    target,
    *,
    uniform: bool = True,
    metrics: dict[str, str | None] | None = None,
    model_ref=None,
    force: bool = False,
    points: Sequence[float] = POINTS,
    data: dict | None = None,
    progress: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
):
    """A Suggestion for `target.axes` allocated on measured loss curves (see the module docstring).

    Args:
        model: the loaded model the scores belong to (left unchanged: each cut is applied to a copy).
        batches: calibration token batches ((B, T) ids), disjoint from whatever the plan is judged on.
        scores, config_dict, target, uniform, metrics, force: as for `surgery.suggest.suggest_plan`.
        model_ref: the ModelRef written into the plan.
        points: fractions of the goal at which each unit's curve is measured.
        data: what the calibration batches are (TokenBlocks.describe()), recorded in the plan's provenance.
        progress: one-line status messages; cancel: checked before each calibration forward (raises Cancelled).

    Returns:
        The Suggestion; summary["axes"] per unit (metric, params, measured loss, curve), summary["measured"] the
        base loss, the mix's and the best single-axis plan's loss increase, and which was kept.
    """
    from surgery.importance.axes import check_axes_target
    from surgery.suggest import finish_suggestion

    check_axes_target(target, target.serve)
    if not 0 < target.params < 1:
        raise UserError(f"--target-params {target.params}: expected the fraction of parameters kept, in (0, 1)")
    if not target.axes:
        raise UserError("measured allocation needs --axes")
    if not batches:
        raise UserError("measured allocation needs calibration batches (--data)")
    if not points or any(not 0 < k <= 1 for k in points):
        raise UserError(f"curve points {tuple(points)}: expected fractions of the cut in (0, 1]")
    files = [scores] if isinstance(scores, ScoreFile) else list(scores)
    m = MeasuredAxes(model, batches, files, config_dict, target, uniform=uniform, metrics=metrics, force=force,
                     points=points, progress=progress, cancel=cancel)
    steps, parts, granularity, report = m.run()
    used = {k: v for s in parts.values() for k, v in s.plan.provenance["metrics"].items()}
    first = next(iter(parts.values())).plan.provenance
    provenance = {**first, "target": target.describe(), "uniform": uniform, "metrics": used,
                  "allocation": {"method": "measured calibration loss curves", "kept": report["kept"],
                                 "base_loss": round(report["base_loss"], 6),
                                 "mix_loss_increase": report["mix_loss"],
                                 "best_single": report["best_single"],
                                 "best_single_loss_increase": report["best_single_loss"],
                                 **({"data": data} if data else {})}}
    provenance.pop("params", None)
    summary = {**merged_summary(parts), "axes": report.pop("units"), "measured": report}
    return finish_suggestion(steps, provenance, config_dict, target, model=model_ref, granularity=granularity,
                             summary=summary)


def suggest_measured_for_source(
    source: str | None,
    score_paths: Sequence,
    target,
    data: str,
    *,
    tokens: int = 8192,
    seq_len: int = 256,
    batch_size: int = 8,
    text_field: str | None = None,
    uniform: bool = True,
    metrics: dict[str, str | None] | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
):
    """`workbench plan suggest --axes ... --data FILE`: scores checked against the source's weights, the model
    loaded, `tokens` calibration tokens of `data` in blocks of `seq_len`, then `suggest_measured`."""
    from surgery.data import load_blocks
    from surgery.loading import load_model, read_config
    from surgery.suggest import scores_for_source

    resolved, files, ref = scores_for_source(source, score_paths, force=force, allow_pickle=allow_pickle,
                                             trust_remote_code=trust_remote_code, progress=progress)
    if progress:
        progress("loading the model")
    loaded = load_model(resolved, trust_remote_code=trust_remote_code)
    if progress:
        progress("tokenizing calibration data")
    blocks = load_blocks(data, loaded.tokenizer, seq_len, tokens, text_field=text_field)
    return suggest_measured(loaded.model, list(blocks.batches(batch_size)), files, read_config(resolved), target,
                            uniform=uniform, metrics=metrics, model_ref=ref, force=force, data=blocks.describe(),
                            progress=progress, cancel=cancel)
