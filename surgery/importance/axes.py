"""`plan suggest --axes`: one parameter target met by any mix of query heads, MLP neurons, whole layers, residual
width (prune_hidden) and MoE experts, chosen by score removed per parameter saved on one scale.

The common scale. Scores are only comparable across axes when they estimate the same thing: the loss increase of
removing the part. The gate scores do (head_grad / head_taylor, neuron_taylor, layer_grad, channel_taylor,
expert_grad: the
sum over calibration batches of |dL_b/d gate|, a first-order estimate of the loss change of moving the gate from
1 to 0), and so do the loss-unit ones (head_ablate, layer_ablate: the exact increase of the mean loss; head_delta,
neuron_delta: its signed first-order estimate). A mix that holds both kinds puts the gate sums in loss units by
dividing them by the number of calibration batches (from the score file's tokens, seq_len and batch_size).
Magnitudes (channel_norm, head_act, neuron_act, expert_freq, expert_reap, layer_bi, *_magnitude, neuron_wanda) are
not losses and have no exchange rate between axes: a mix refuses them, one axis alone may use them.

The allocation:
1. per axis, its legal cuts as (parameters removed, score removed) options: heads: the uniform (m KV groups x k
   heads) states, or one per layer with non-uniform; neurons: each layer's n lowest (the same n everywhere, or per
   layer); layers: the k lowest by score per parameter; hidden: the k lowest channels for every k the family's
   config can express (`prune_hidden` is one cut shared by every layer: the residual stream is shared); experts:
   each MoE layer's k lowest, never below top-k, the same k in every MoE layer when uniform (plain transformers
   loads one count) or one k per layer with non-uniform (per-layer counts load with surgery.load);
2. all of them together for the parameter goal: per option group the lower convex hull, then hull segments
   across every axis in order of score per parameter, each taken while the total stays within the goal;
3. layers dropped in step 2 take their heads, neurons and experts with them, so step 2 runs again on the kept
   layers for what is left of the goal;
4. exact fill: the amounts above add parameter costs of the unpruned model, but cuts interact (a removed channel
   makes every head and neuron cheaper). The axis with the finest legal step is chosen again against exact
   counts (`surgery.estimate` of the whole plan, a meta-device model) by bisection, so the plan's parameter count
   is within one step of that axis of the target, as the estimate counts it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from surgery.errors import PlanError, UserError
from surgery.importance.allocate import Allocator, head_states, hull_allocate, scores_for
from surgery.importance.hull import hull_segments

AXES = ("heads", "neurons", "layers", "hidden", "experts")
GATE_SUMS = {"head_grad", "head_taylor", "neuron_taylor", "layer_grad", "channel_taylor", "expert_grad"}
LOSS_UNITS = {"head_ablate", "layer_ablate", "head_delta", "neuron_delta"}
# per axis, the metrics it can use, best first (the loss estimates first: a mix takes the first of those present)
CANDIDATES = {
    "heads": ("head_grad", "head_taylor", "head_ablate", "head_delta", "head_act", "head_magnitude"),
    "neurons": ("neuron_taylor", "neuron_delta", "neuron_wanda", "neuron_act", "neuron_magnitude"),
    "layers": ("layer_grad", "layer_ablate", "layer_bi"),
    "hidden": ("channel_taylor", "channel_norm"),
    "experts": ("expert_grad", "expert_reap", "expert_freq"),
}
_HOW = {"heads": "head-grad", "neurons": "neuron-taylor", "layers": "layer-grad", "hidden": "channel-taylor",
        "experts": "expert-grad"}


def parse_axes(text: str) -> tuple[str, ...]:
    """"hidden,layers" -> ("layers", "hidden") (canonical order); anything else is a UserError."""
    names = [a.strip().lower() for a in str(text).split(",") if a.strip()]
    bad = [a for a in names if a not in AXES]
    if bad or not names:
        raise UserError(f"--axes {text!r}: expected a comma-separated subset of {', '.join(AXES)}")
    return tuple(a for a in AXES if a in names)


@dataclass
class Axis:
    """One axis's legal cuts: option groups of (parameters removed, score removed), one group per independent
    decision (the whole model when uniform, else one per layer); `decide(picks)` -> what the picks remove."""

    name: str
    metric: str
    groups: list[list[tuple[float, float]]]
    decide: Callable[[list[int]], dict]
    picks: list[int] = field(default_factory=list)

    @property
    def unit(self) -> float:
        """Parameters of its smallest legal cut (the finest axis fills the target exactly)."""
        amounts = [a for g in self.groups for a, _ in g if a > 0]
        return min(amounts) if amounts else math.inf

    def chosen(self) -> tuple[float, float]:
        """(parameters, score) the current picks remove, by the nominal costs."""
        return (sum(g[p][0] for g, p in zip(self.groups, self.picks)),
                sum(g[p][1] for g, p in zip(self.groups, self.picks)))

    def cheapest_price(self) -> float:
        """Score per parameter of its cheapest first cut: where the greedy would start on this axis."""
        prices = [c / a for g in self.groups for a, c in g if a > 0]
        return min(prices) if prices else math.inf


def check_axes_target(target, serve: str | None) -> None:
    """The refusals every `--axes` allocation shares (gate scores here, measured curves in `measured`): a parameter
    budget is needed, the amounts are its own to choose, and `serve` (the --serve runtime, or None) is not supported."""
    if target.params is None:
        raise UserError("--axes needs --target-params (the parameter budget the axes share)")
    given = [f"--{n.replace('_', '-')}" for n in ("heads", "neurons", "layers", "low_rank") if getattr(target, n)]
    if given:
        raise UserError(f"--axes chooses the amounts itself: drop {', '.join(given)}")
    if serve is not None:
        raise UserError(f"--axes with --serve {serve} is not supported: pick the axes without --serve")


def _cumulative(scores: torch.Tensor) -> tuple[list[int], list[float]]:
    """(indices lowest first, cumulative sums of the sorted scores with a leading 0)."""
    order = torch.argsort(scores.double(), stable=True)
    return order.tolist(), [0.0, *torch.cumsum(scores.double()[order], 0).tolist()]


class AxesAllocator(Allocator):
    """The Allocator for `Target.axes` (see the module docstring); `run()` returns plan steps."""

    def __init__(self, layout, costs, scores, target, uniform, metrics, *, config_dict: dict, rules=None):
        super().__init__(layout, costs, scores, target, uniform, metrics, rules=rules)
        from surgery.shapes import shape_from_config

        self.config_dict, self.shape = config_dict, shape_from_config(config_dict)
        self.channels: list[int] = []
        self.experts: dict[int, list[int]] = {}
        self.report: dict[str, dict] = {}

    # -- which axes and metrics --------------------------------------------------------------------------------
    def _legal_axes(self) -> list[str]:
        sites, spec = self.layout.layers, self.layout.spec
        dense_in_moe = any(s.experts is not None for s in sites) and any(s.down is not None for s in sites)
        have = {
            "heads": any(s.o_proj is not None and s.heads for s in sites),
            "neurons": any(s.down is not None and s.width > 1 for s in sites),
            "layers": len(sites) > 1 and not dense_in_moe,  # resolve: no drop_layers with dense MoE layers yet
            "hidden": spec.hidden_prunable,
            "experts": any(s.experts is not None for s in sites),
        }
        return [a for a in AXES if have[a]]

    def _check_target(self) -> None:
        t = self.target
        check_axes_target(t, self.rules.runtime if self.rules is not None else None)
        if self.wanted.get("kv"):  # the heads axis prices KV groups with the heads' own metric (head_states)
            raise UserError("--axes ranks KV groups by the heads' metric: drop --kv-metric (or cut without --axes)")
        legal = self._legal_axes()
        bad = [a for a in t.axes if a not in legal]
        if bad:
            raise UserError(f"--axes {','.join(bad)}: this {self.layout.spec.family} model cannot be cut along "
                            f"{'it' if len(bad) == 1 else 'them'}; axes for this model: {', '.join(legal)}")

    def _pick_metrics(self) -> dict[str, float]:
        """Choose each axis's metric (self.used) and return the factor that puts it on the common scale."""
        have, mixing = self.scores.metrics(), len(self.target.axes) > 1
        for axis in self.target.axes:
            wanted = (self.wanted.get(axis) or "").replace("-", "_")
            if wanted:
                if wanted not in CANDIDATES[axis]:
                    raise UserError(f"--{_OPTION[axis]} {wanted}: not a {axis} score (use {', '.join(CANDIDATES[axis])})")
                if wanted not in have:
                    raise UserError(f"the scores have no {wanted!r} (they have: {', '.join(sorted(have))})")
                metric = wanted
            else:
                usable = [m for m in CANDIDATES[axis] if m in have and (not mixing or m in GATE_SUMS | LOSS_UNITS)]
                if not usable:
                    need = "a first-order loss score" if mixing else "a score"
                    raise UserError(f"the scores have no {axis} metric ({need}: {', '.join(CANDIDATES[axis])}): score "
                                    f"with --method {_HOW[axis]}")
                metric = usable[0]
            if mixing and metric not in GATE_SUMS | LOSS_UNITS:
                raise UserError(f"--axes {','.join(self.target.axes)} compares score removed per parameter across axes, "
                                f"which needs first-order loss estimates; {metric} ({axis}) is a magnitude with no "
                                f"exchange rate: use {_HOW[axis]}, or one axis alone")
            self.used[axis] = metric
        kinds = {m in GATE_SUMS for m in self.used.values()}
        scale = 1.0
        if len(kinds) > 1:  # gate sums over batches next to loss-unit scores: sums -> mean per batch
            m = self.scores.meta
            if not (m.tokens and m.seq_len and m.batch_size):
                raise UserError("mixing gate scores with loss-unit scores needs the batch count: the score file "
                                "lacks tokens / seq_len / batch_size")
            scale = 1.0 / math.ceil((m.tokens // m.seq_len) / m.batch_size)
        return {a: (scale if self.used[a] in GATE_SUMS else 1.0) for a in self.target.axes}

    def _scores(self, axis: str, path: str, size: int) -> torch.Tensor:
        return scores_for(self.scores, path, self.used[axis], size).double() * self.scale[axis]

    # -- the axes ----------------------------------------------------------------------------------------------
    def _heads_axis(self, sites) -> Axis:
        sites = [s for s in sites if s.o_proj is not None and s.heads]
        per_layer = [head_states(self._scores("heads", s.attn_path, s.heads), s.kv_heads, self.costs.head[s.index],
                                 self.costs.kv[s.index]) for s in sites]
        if self.uniform:
            if len({(s.heads, s.kv_heads) for s in sites}) > 1:
                raise UserError("layers differ in head counts: a uniform cut is impossible, pass --non-uniform")
            group = [(sum(st[j].params for st in per_layer), sum(st[j].cost for st in per_layer))
                     for j in range(len(per_layer[0]))]

            def decide(picks):
                return {s.index: st[picks[0]] for s, st in zip(sites, per_layer) if st[picks[0]].removed}

            return Axis("heads", self.used["heads"], [group], decide)
        groups = [[(x.params, x.cost) for x in st] for st in per_layer]
        return Axis("heads", self.used["heads"], groups, lambda picks: {
            s.index: st[p] for s, st, p in zip(sites, per_layer, picks) if st[p].removed})

    def _neurons_axis(self, sites) -> Axis:
        sites = [s for s in sites if s.down is not None and s.width > 1]
        ranked = [_cumulative(self._scores("neurons", s.mlp_path, s.width)) for s in sites]
        cost = [self.costs.neuron[s.index] for s in sites]
        if self.uniform:
            most = min(s.width for s in sites) - 1
            group = [(n * sum(cost), sum(cum[n] for _, cum in ranked)) for n in range(most + 1)]
            return Axis("neurons", self.used["neurons"], [group], lambda picks: {
                s.index: sorted(order[:picks[0]]) for s, (order, _) in zip(sites, ranked) if picks[0]})
        groups = [[(n * c, cum[n]) for n in range(s.width)] for s, (_, cum), c in zip(sites, ranked, cost)]
        return Axis("neurons", self.used["neurons"], groups, lambda picks: {
            s.index: sorted(order[:p]) for s, (order, _), p in zip(sites, ranked, picks) if p})

    def _layers_axis(self, sites) -> Axis:
        n = len(self.layout.layers)
        scores = self._scores("layers", self.layout.model_path, n)
        index = [s.index for s in sites]
        order = sorted(index, key=lambda i: (float(scores[i]) / max(self.costs.layer[i], 1), i))
        group, amount, total = [(0.0, 0.0)], 0.0, 0.0
        for i in order[:-1]:  # keep at least one layer
            amount, total = amount + self.costs.layer[i], total + float(scores[i])
            group.append((amount, total))
        return Axis("layers", self.used["layers"], [group], lambda picks: {"layers": sorted(order[:picks[0]])})

    def _hidden_axis(self) -> Axis:
        hidden, spec = self.shape.hidden, self.layout.spec
        step = self.shape.base_heads if spec.hidden_divisible_by_heads else 1  # KNOWN_TRAPS 2
        order, cum = _cumulative(self._scores("hidden", self.layout.model_path, hidden))
        ks = [hidden - kept for kept in range(hidden, step - 1, -step)]  # kept sizes the config can express
        per_channel = self._channel_cost(ks[1]) if len(ks) > 1 else 0
        group = [(k * per_channel, cum[k]) for k in ks]
        return Axis("hidden", self.used["hidden"], [group], lambda picks: {"channels": sorted(order[:ks[picks[0]]])})

    def _channel_cost(self, k: int) -> float:
        """Parameters one residual channel owns (embedding column, norm weights, projection rows and columns):
        measured by removing `k` channels, a size the family can express."""
        return self._removed([{"op": "prune_hidden", "channels": list(range(k))}]) / k

    def _experts_axis(self, sites) -> Axis:
        sites = [s for s in sites if s.experts is not None]
        ranked = [_cumulative(self._scores("experts", s.mlp_path, s.num_experts)) for s in sites]
        per = []
        for s in sites:  # prune_experts slices dim 0 of every experts and router parameter
            owned = [*s.experts.parameters(recurse=False), *s.router.parameters(recurse=False)]
            per.append(sum(p.numel() for p in owned) / s.num_experts)
        if not self.uniform:  # per-layer expert counts (surgery.load rebuilds each layer), never below top-k
            groups = [[(k * c, cum[k]) for k in range(s.num_experts - self.shape.top_k + 1)]
                      for s, (_, cum), c in zip(sites, ranked, per)]
            return Axis("experts", self.used["experts"], groups, lambda picks: {
                s.index: sorted(order[:p]) for s, (order, _), p in zip(sites, ranked, picks) if p})
        most = min(s.num_experts for s in sites) - self.shape.top_k
        group = [(k * sum(per), sum(cum[k] for _, cum in ranked)) for k in range(most + 1)]
        return Axis("experts", self.used["experts"], [group], lambda picks: {
            s.index: sorted(order[:picks[0]]) for s, (order, _) in zip(sites, ranked) if picks[0]})

    def _build(self, dropped: set[int]) -> list[Axis]:
        kept = [s for s in self.layout.layers if s.index not in dropped]
        make = {"heads": lambda: self._heads_axis(kept), "neurons": lambda: self._neurons_axis(kept),
                "layers": lambda: self._layers_axis(kept), "hidden": self._hidden_axis,
                "experts": lambda: self._experts_axis(kept)}
        return [make[a]() for a in self.target.axes if not (dropped and a == "layers")]

    # -- exact counts ------------------------------------------------------------------------------------------
    def _removed(self, steps: list[dict]) -> int:
        return params_removed(self.config_dict, self.shape, steps)

    def _apply(self, axes: list[Axis], layers: dict | None = None) -> list[dict]:
        """Steps for the axes' current picks (and a fixed layer decision)."""
        decided = {a.name: a.decide(a.picks) for a in axes}
        if layers is not None:
            decided["layers"] = layers
        self.heads = decided.get("heads", {})
        self.neurons = decided.get("neurons", {})
        self.dropped = decided.get("layers", {}).get("layers", [])
        self.channels = decided.get("hidden", {}).get("channels", [])
        self.experts = decided.get("experts", {})
        steps = super()._steps()
        if self.channels:
            steps.append({"op": "prune_hidden", "channels": self.channels})
        steps += [{"op": "prune_experts", "layer": i, "experts": e} for i, e in sorted(self.experts.items()) if e]
        return steps

    def _fill(self, axes: list[Axis], filler: Axis, goal: float, layers: dict | None) -> None:
        """Re-choose `filler`'s picks against exact counts: the removal closest to `goal` (bisection)."""
        single = len(filler.groups) == 1
        if single:  # every option of the one group, by amount (cheapest of equal amounts)
            opts = sorted(range(len(filler.groups[0])), key=lambda i: filler.groups[0][i])
            domain = [i for k, i in enumerate(opts) if k == 0 or filler.groups[0][i][0] > filler.groups[0][opts[k - 1]][0]]
            top = len(domain) - 1
        else:  # per-layer groups: the hull greedy for a budget of x parameters
            top = int(sum(max(a for a, _ in g) for g in filler.groups))

        def at(x: int) -> int:
            filler.picks = [domain[x]] if single else hull_allocate(filler.groups, x)
            return self._removed(self._apply(axes, layers))

        lo, hi = 0, top
        r_lo, r_hi = at(lo), at(hi)
        if r_hi <= goal:
            lo, r_lo = hi, r_hi
        while hi - lo > 1 and r_lo < goal < r_hi:
            mid = (lo + hi) // 2
            r = at(mid)
            if r <= goal:
                lo, r_lo = mid, r
            else:
                hi, r_hi = mid, r
        best = lo if abs(r_lo - goal) <= abs(r_hi - goal) else hi
        at(best)
        self.granularity = int(abs(r_hi - r_lo)) if r_hi > goal > r_lo else int(filler.unit)
        reached = r_lo if best == lo else r_hi
        if abs(reached - goal) > self.granularity:
            total = self.costs.total
            raise UserError(f"--axes {','.join(self.target.axes)} can remove {reached:,} parameters at most "
                            f"({1 - reached / total:.1%} kept) toward --target-params {self.target.params}: add "
                            "axes or raise the target")

    # -- the whole target --------------------------------------------------------------------------------------
    def _allocate(self, budget: float) -> tuple[list[Axis], dict | None, Axis | None]:
        """Steps 1-3: the axes with their picks, the layer decision (when layers are dropped next to other axes)
        and the layers axis that made it."""
        axes = self._build(set())
        for a, picks in zip(axes, _split(_greedy([g for a in axes for g in a.groups], budget), axes)):
            a.picks = picks
        lay = next((a for a in axes if a.name == "layers"), None)
        if lay is None or not lay.picks[0] or len(axes) == 1:
            return axes, None, None
        layers = lay.decide(lay.picks)  # dropped layers take their heads, neurons and experts along
        rest = self._build(set(layers["layers"]))
        left = budget - lay.chosen()[0]
        for a, picks in zip(rest, _split(_greedy([g for a in rest for g in a.groups], left), rest)):
            a.picks = picks
        return rest, layers, lay

    def run(self) -> list[dict]:
        self._check_target()
        self.scale = self._pick_metrics()
        goal = self.costs.total * (1 - self.target.params)
        budget = goal
        for _ in range(3):  # coarse cuts may pass the goal once counted exactly: allocate again with less
            axes, layers, lay = self._allocate(budget)
            filler = min(axes, key=lambda a: a.unit)  # the finest legal step fills the rest exactly
            filler.picks = [0] * len(filler.groups)
            fixed = self._removed(self._apply(axes, layers))
            if fixed <= goal:
                break
            budget -= fixed - goal
        self._fill(axes, filler, goal, layers)
        steps = self._apply(axes, layers)
        self._describe([*axes, *([lay] if layers else [])], steps, filler)
        return steps

    def _describe(self, every: list[Axis], steps: list[dict], filler: Axis) -> None:
        """self.report: per axis its metric, parameters removed (its own steps alone, exact), score removed, and
        score per million parameters (what the allocation compared)."""
        by_op = {"heads": ("prune_heads", "prune_kv_groups"), "neurons": ("prune_neurons",),
                 "layers": ("drop_layers",), "hidden": ("prune_hidden",), "experts": ("prune_experts",)}
        for a in every:
            own = [s for s in steps if s["op"] in by_op[a.name]]
            params = self._removed(own) if own else 0
            score = a.chosen()[1]
            self.report[a.name] = {
                "metric": a.metric, "params": params, "score": round(score, 6),
                "score_per_m_params": round(score / params * 1e6, 6) if params else None,
                "cheapest_per_m_params": round(a.cheapest_price() * 1e6, 6) if a.cheapest_price() < math.inf else None,
                "fills": a is filler,
            }
        self.summary["axes"] = self.report
        self.summary["hidden_removed"] = len(self.channels)
        self.summary["experts_removed"] = {i: len(e) for i, e in self.experts.items() if e}


def params_removed(config_dict: dict, shape, steps: list[dict]) -> int:
    """Parameters `steps` remove, exactly (a meta-device model with the plan applied)."""
    from surgery.estimate import estimate
    from surgery.plan import parse_plan
    from surgery.resolve import resolve_plan

    try:
        e = estimate(config_dict, resolve_plan(parse_plan({"version": 1, "steps": steps}), shape))
    except PlanError as exc:  # ours: every option is a legal cut
        raise RuntimeError(f"plan suggest --axes built an invalid plan: {exc}") from None
    return e.params_before - e.params_after


_OPTION = {"heads": "head-metric", "neurons": "neuron-metric", "layers": "layer-metric", "hidden": "channel-metric",
           "experts": "expert-metric"}


def _greedy(groups: list[list[tuple[float, float]]], budget: float) -> list[int]:
    """`hull_allocate` that never passes the budget: hull segments of every group in order of score per
    parameter, each taken while the total stays within `budget` (the finest axis then fills the rest exactly)."""
    choice, segments = hull_segments(groups)
    total, frozen = 0.0, set()
    for _, g, _, to, d in segments:
        if g in frozen:
            continue
        if total + d <= budget:
            total += d
            choice[g] = to
        else:
            frozen.add(g)  # its later segments are steeper and need this one first
    return choice


def _split(choice: list[int], axes: list[Axis]) -> list[list[int]]:
    """hull_allocate's flat choice (one per group of every axis) -> per axis its picks."""
    out, at = [], 0
    for a in axes:
        out.append(choice[at:at + len(a.groups)])
        at += len(a.groups)
    return out
