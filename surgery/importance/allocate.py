"""Allocation for `surgery.suggest`: GQA-legal head states and the choice of what to remove in every layer for a
target (uniform or per layer); parameter costs come from `costs`, low-rank choices from `ranks`.

Scores: higher = more important, for every metric; the lowest go first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery.errors import UserError
from surgery.importance.costs import Costs
from surgery.importance.hull import hull_segments
from surgery.importance.layout import LayerSite, ModelLayout
from surgery.importance.ranks import RankChoice, choose_ranks, gradient_ranks, gradient_summary, selected_linears
from surgery.importance.scorefile import ScoreFile

# Default metric per component, best first, from the demo benchmark at 80% of the parameters (docs/benchmarks.md,
# scoring): uniform cuts did best with head_delta, per-layer (non-uniform) cuts with head_grad; neuron_delta is never
# a default: for removing a quarter of the neurons at once it did far worse than neuron_taylor.
PREFERRED = {
    "heads": ("head_delta", "head_ablate", "head_grad", "head_taylor", "head_act", "head_magnitude"),
    "heads_non_uniform": ("head_grad", "head_taylor", "head_ablate", "head_delta", "head_act", "head_magnitude"),
    "neurons": ("neuron_taylor", "neuron_wanda", "neuron_act", "neuron_magnitude"),
    "layers": ("layer_ablate", "layer_bi"),
    # low_rank keeps the top singular vectors of W (plain truncated SVD, surgery.ops.low_rank): the energy of `sv`
    # is exactly what that truncation keeps; sv_act describes an activation-aware factorisation ops does not do
    # (on the demo both were ruinous without recovery: docs/scoring.md)
    "ranks": ("sv", "sv_act"),
    "kv": (),  # KV-group scores are only used when asked for (--kv-metric): no measurement favours them yet
}
_HOW = {"heads": "head-delta", "neurons": "neuron-taylor", "layers": "layer-bi", "ranks": "sv",
        "kv": "kv-group-grad"}


@dataclass
class HeadState:
    m: int  # kept KV groups
    k: int  # kept query heads per kept group
    removed: list[int]
    params: int
    cost: float


def head_states(scores: torch.Tensor, n_kv: int, head_cost: int, kv_cost: int,
                group_scores: torch.Tensor | None = None) -> list[HeadState]:
    """Every GQA-legal way to prune one layer, best heads kept for each (m groups x k heads); includes no cut.

    The m kept groups are those whose k best heads have the highest summed score, or, with `group_scores`
    ([n_kv], e.g. kv_group_grad), the m highest-scored groups (ties: the summed head scores). The k heads kept in
    a group and the cost of a state (summed score of the removed heads) always come from `scores`.
    """
    h = scores.numel()
    g = h // n_kv
    s = scores.double().view(n_kv, g)
    order = torch.argsort(-s, dim=1, stable=True)  # per group, best first
    states = []
    for k in range(1, g + 1):
        kept_value = s.gather(1, order[:, :k]).sum(1)  # (n_kv,)
        groups = torch.argsort(-kept_value, stable=True)
        if group_scores is not None:  # re-sort by the group score; stable, so equal ones keep the head-sum order
            groups = groups[torch.argsort(-group_scores.double()[groups], stable=True)]
        for m in range(1, n_kv + 1):
            keep = {int(grp) * g + int(j) for grp in groups[:m] for j in order[int(grp), :k]}
            removed = [i for i in range(h) if i not in keep]
            params = len(removed) * head_cost + (n_kv - m) * kv_cost
            states.append(HeadState(m, k, removed, params, float(scores.double()[removed].sum()) if removed else 0.0))
    return states


def hull_allocate(options: list[list[tuple[float, float]]], budget: float) -> list[int]:
    """Pick one option per layer so the summed amount is closest to `budget` at low summed cost.

    options[l] is a list of (amount, cost) including (0, 0). A convex-hull greedy: per layer, the lower convex hull
    of its options; all hull segments across layers are taken in order of cost per amount while they bring the
    total closer to the budget. Returns the chosen option index per layer.
    """
    choice, segments = hull_segments(options)
    total, frozen = 0.0, set()
    for _, layer, _, to, d in segments:
        if layer in frozen:
            continue
        if total + d <= budget or (total + d - budget) < (budget - total):
            total += d
            choice[layer] = to
            if total >= budget:
                break
        else:
            frozen.add(layer)  # later segments of this layer are steeper and need this one first
    return choice


def pick_metric(scores: ScoreFile, kind: str, wanted: str | None, uniform: bool = True) -> str:
    have = scores.metrics()
    if wanted:
        metric = wanted.replace("-", "_")
        if metric not in have:
            raise UserError(f"the scores have no {metric!r} (they have: {', '.join(sorted(have))})")
        return metric
    for metric in PREFERRED.get(f"{kind}_non_uniform" if not uniform else kind, PREFERRED[kind]):
        if metric in have:
            return metric
    raise UserError(
        f"the scores have no {kind[:-1]} metric ({', '.join(PREFERRED[kind])}): score with --method {_HOW[kind]}"
    )


def scores_for(scores: ScoreFile, path: str, metric: str, size: int) -> torch.Tensor:
    t = scores.get(path, metric)
    if t is None or t.numel() != size:
        got = "missing" if t is None else f"{t.numel()} values"
        raise UserError(f"score {path}/{metric} is {got}, the model needs {size}: scores for another model?")
    return t.float()




class Allocator:
    """Decides what every layer loses for a Target; `run()` returns plan steps (dicts).

    Attributes after run(): `used` (component -> metric name), `summary` (per-layer counts), `granularity`
    (parameters of the finest step used to hit a parameter target).
    """

    def __init__(self, layout: ModelLayout, costs: Costs, scores: ScoreFile, target, uniform: bool,
                 metrics: dict[str, str | None], rules=None):
        self.layout, self.costs, self.scores, self.target, self.uniform = layout, costs, scores, target, uniform
        self.rules = rules  # surgery.export.runtimes.ServeRules: only shapes that runtime runs without padding
        self.wanted = metrics
        self.used: dict[str, str] = {}
        self.summary: dict = {}
        self.granularity = 0
        self.removed = 0  # parameters removed so far
        self.dropped: list[int] = []
        self.heads: dict[int, HeadState] = {}
        self.neurons: dict[int, list[int]] = {}
        self.ranks: RankChoice | None = None

    # -- scores ------------------------------------------------------------------------------------------------
    def _metric(self, kind: str) -> str:
        if kind not in self.used:
            self.used[kind] = pick_metric(self.scores, kind, self.wanted.get(kind), self.uniform)
        return self.used[kind]

    def _group_scores(self, site: LayerSite) -> torch.Tensor | None:
        """The KV-group scores of a layer when --kv-metric asked for them, else None."""
        if not self.wanted.get("kv"):
            return None
        metric = self._metric("kv")
        if not metric.startswith("kv_"):
            raise UserError(f"--kv-metric {metric}: not a KV-group score (use kv-group-grad)")
        return scores_for(self.scores, site.attn_path, metric, site.kv_heads)

    def _head_sites(self) -> list[LayerSite]:
        return [s for s in self.layout.layers if s.index not in self.dropped and s.o_proj is not None and s.heads]

    def _mlp_sites(self) -> list[LayerSite]:
        return [s for s in self.layout.layers if s.index not in self.dropped and s.down is not None and s.width > 1]

    # -- components --------------------------------------------------------------------------------------------
    def _drop_layers(self, amount) -> None:
        n = len(self.layout.layers)
        count = amount.count(n)
        if count >= n:
            raise UserError(f"--layers {amount} would drop all {n} layers; keep at least one")
        if count <= 0:
            return
        metric = self._metric("layers")
        s = scores_for(self.scores, self.layout.model_path, metric, n)
        self.dropped = sorted(int(i) for i in torch.argsort(s, stable=True)[:count])
        self.removed += sum(self.costs.layer[i] for i in self.dropped)

    def _choose_heads(self, budget: float, unit: str, cap: float) -> None:
        """Remove heads so the amount (`unit`: "heads" or "params") is closest to `budget`, params <= `cap`."""
        sites = self._head_sites()
        if not sites or budget <= 0 or (self.rules and not self.rules.cut_heads):
            return
        metric = self._metric("heads")
        per_layer = []
        for site in sites:
            sc = scores_for(self.scores, site.attn_path, metric, site.heads)
            per_layer.append(head_states(sc, site.kv_heads, self.costs.head[site.index], self.costs.kv[site.index],
                                         self._group_scores(site)))

        def amount(st: HeadState) -> float:
            return len(st.removed) if unit == "heads" else st.params

        if self.uniform:
            if len({(s.heads, s.kv_heads) for s in sites}) > 1:
                raise UserError("layers differ in head counts: a uniform cut is impossible, pass --non-uniform")
            candidates = []
            for j in range(len(per_layer[0])):
                states = [states[j] for states in per_layer]
                params = sum(st.params for st in states)
                if params <= cap:
                    total = sum(amount(st) for st in states)
                    candidates.append((abs(total - budget), sum(st.cost for st in states), j))
            j = min(candidates)[2]
            chosen = [states[j] for states in per_layer]
        else:
            options = [[(amount(st), st.cost) for st in states] + [(0, 0.0)] for states in per_layer]
            picks = hull_allocate(options, budget)
            chosen = [states[p] if p < len(states) else None for states, p in zip(per_layer, picks)]
        for site, st in zip(sites, chosen):
            if st is not None and st.removed:
                self.heads[site.index] = st
                self.removed += st.params

    def _gradient_ranks(self) -> bool:
        """True when ranks come from sv_grad (a global allocation for a budget), not from energy per matrix."""
        wanted = (self.wanted.get("ranks") or "").replace("-", "_")
        if self.target.rank_params is not None and wanted not in ("", "sv_grad"):
            raise UserError(f"--rank-params is a budget for --rank-metric sv-grad, not {wanted}: use --rank-keep")
        return self.target.rank_params is not None or wanted == "sv_grad"

    def _ranks_take_goal(self, goal: float | None) -> bool:
        """sv_grad ranks with no --rank-params: low rank alone removes what --target-params asks."""
        if not self._gradient_ranks() or self.target.rank_params is not None:
            return False
        if self.target.heads is not None or self.target.neurons is not None:
            raise UserError("--rank-metric sv-grad with --heads/--neurons amounts: give low rank its own budget "
                            "with --rank-params F")
        if goal - self.removed <= 0:
            raise UserError(f"--target-params {self.target.params}: nothing left for low rank to remove")
        return True

    def _choose_ranks(self, budget: int | None = None) -> None:
        """low_rank steps for the Linears the target names (`low_rank`): at the rank keeping `rank_keep` of each
        one's energy, or (sv_grad) allocated globally for `budget` parameters / the `rank_params` fraction."""
        t = self.target
        if self.rules:
            raise UserError(f"--serve {self.rules.runtime} with --low-rank: the export would multiply the factors "
                            "back into dense weights (more parameters than the plan promises); drop one")
        kept = [s for s in self.layout.layers if s.index not in self.dropped]
        if self._gradient_ranks():
            self.used["ranks"] = pick_metric(self.scores, "ranks", "sv_grad")
            pick_metric(self.scores, "ranks", "sv")  # the singular values the gradients multiply
            if budget is None:
                total = sum(o * i for _, _, o, i in selected_linears(self.layout, kept, t.low_rank))
                budget = round(total * (1 - t.rank_params))
            self.ranks = gradient_ranks(self.layout, kept, t.low_rank, budget, lambda path, size: (
                scores_for(self.scores, path, "sv", size), scores_for(self.scores, path, "sv_grad", size)))
        else:
            metric = self._metric("ranks")
            self.ranks = choose_ranks(self.layout, kept, t.low_rank, t.rank_keep,
                                      lambda path, size: scores_for(self.scores, path, metric, size))
        self.removed += self.ranks.removed

    def _choose_neurons(self, budget: float, unit: str) -> None:
        """Remove neurons so the amount (`unit`: "neurons" or "params") is closest to `budget`."""
        sites = self._mlp_sites()
        if not sites or budget <= 0:
            return
        metric = self._metric("neurons")
        scores = {s.index: scores_for(self.scores, s.mlp_path, metric, s.width) for s in sites}
        cost = {s.index: (1 if unit == "neurons" else self.costs.neuron[s.index]) for s in sites}
        grain = self.rules.neuron_grain if self.rules else 1
        if grain > 1:
            self._choose_neuron_blocks(sites, scores, cost, budget, grain)
        elif self.uniform:
            step = sum(cost.values())
            per = round(budget / step)
            most = min(s.width for s in sites) - 1
            if per > most:
                raise UserError(
                    f"the target needs {per} neurons removed per layer but layers have {most + 1}: keep more "
                    "(a higher --target-params or fewer neurons), or drop whole layers too (--layers, or layers "
                    "in --axes)"
                )
            for s in sites:
                if per:
                    self.neurons[s.index] = sorted(int(i) for i in torch.argsort(scores[s.index], stable=True)[:per])
            self.granularity = sum(self.costs.neuron[s.index] for s in sites)
        else:
            ranked = sorted((float(v), s.index, j) for s in sites for j, v in enumerate(scores[s.index].tolist()))
            left = {s.index: s.width - 1 for s in sites}  # every layer keeps at least one neuron
            total = 0.0
            for _, layer, j in ranked:
                if left[layer] == 0:
                    continue
                d = cost[layer]
                if total + d > budget and total + d - budget >= budget - total:
                    break
                total += d
                left[layer] -= 1
                self.neurons.setdefault(layer, []).append(j)
            for layer in self.neurons:
                self.neurons[layer].sort()
            self.granularity = max(self.costs.neuron[s.index] for s in sites)
        self.removed += sum(len(v) * self.costs.neuron[i] for i, v in self.neurons.items())

    def _choose_neuron_blocks(self, sites, scores, cost, budget: float, grain: int) -> None:
        """Neurons in blocks of `grain` (a runtime's width grid): every kept width a multiple of `grain`, >= grain.

        A layer's blocks are its lowest-scored neurons in order: first the off-grid remainder (width % grain,
        always removed, else the export pads it back), then whole blocks. Uniform: the same number of blocks in
        every layer; non-uniform: blocks by mean score, lowest first, while they bring the total closer to budget.
        """
        blocks = []  # (mean score, layer, neurons)
        for s in sites:
            order = torch.argsort(scores[s.index], stable=True).tolist()
            rest = s.width % grain
            if s.width - rest < grain:
                continue  # narrower than one block: nothing it can lose and stay on the grid
            if rest:
                self.neurons[s.index] = sorted(order[:rest])
            for b in range((s.width - rest) // grain - 1):  # every layer keeps at least one block
                chunk = order[rest + b * grain: rest + (b + 1) * grain]
                blocks.append((float(scores[s.index][chunk].mean()), b, s.index, chunk))
        total = sum(len(v) * cost[i] for i, v in self.neurons.items())
        if self.uniform:
            per_block = sum(grain * cost[s.index] for s in sites)
            count = max(0, round((budget - total) / per_block)) if per_block else 0
            chosen = [blk for blk in blocks if blk[1] < count]
        else:
            chosen = []
            # by mean score alone: a layer's later blocks hold higher scores, so they come after its earlier ones
            for blk in sorted(blocks, key=lambda x: (x[0], x[2], x[1])):
                d = grain * cost[blk[2]]
                if total + d > budget and total + d - budget >= budget - total:
                    continue
                total += d
                chosen.append(blk)
        for _, _, layer, chunk in chosen:
            self.neurons.setdefault(layer, []).extend(chunk)
        for layer in self.neurons:
            self.neurons[layer].sort()
        self.granularity = max(grain * self.costs.neuron[s.index] for s in sites)

    # -- the whole target --------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        t = self.target
        goal = None if t.params is None else self.costs.total * (1 - t.params)
        if goal is not None and t.heads is not None and t.neurons is not None:
            raise UserError("--target-params with both --heads and --neurons leaves nothing to adjust; drop one")
        if goal is None and not (t.heads or t.neurons or t.layers or t.low_rank):
            raise UserError("no target: pass --target-params 0.8, --heads / --neurons / --layers amounts, or "
                            "--low-rank with --rank-keep")
        if t.layers is not None:
            self._drop_layers(t.layers)
        if t.low_rank:
            if self._ranks_take_goal(goal):
                self._choose_ranks(round(goal - self.removed))
                goal = None  # low rank alone meets the target: nothing is pruned to fill it
                self.granularity = self.ranks.last_step
            else:
                self._choose_ranks()
        reserved = self.ranks.blocks if self.ranks else set()  # factorised blocks are not pruned
        if "attn" in reserved and t.heads is not None:
            raise UserError("--low-rank factorises attention and --heads prunes it: pick one for attention")
        if "mlp" in reserved and t.neurons is not None:
            raise UserError("--low-rank factorises the MLP and --neurons prunes it: pick one for the MLP")
        heads_free = t.heads is None and "attn" not in reserved
        neurons_free = t.neurons is None and "mlp" not in reserved
        if goal is not None and not (heads_free or neurons_free):
            raise UserError("--target-params leaves nothing to adjust: --low-rank and the component amounts "
                            "cover both attention and the MLP; drop one")
        if t.heads is not None:
            total = sum(s.heads for s in self._head_sites())
            self._choose_heads(t.heads.count(total), "heads", float("inf"))
        if t.neurons is not None:
            total = sum(s.width for s in self._mlp_sites())
            self._choose_neurons(t.neurons.count(total), "neurons")
        if goal is not None:
            remaining = goal - self.removed
            if remaining < 0:
                raise UserError(
                    f"the component amounts{' and low-rank factors' if self.ranks else ''} already remove "
                    f"{self.removed:,} parameters, more than --target-params "
                    f"{t.params} allows ({round(goal):,}); lower them or raise the target"
                )
            if heads_free and neurons_free:
                attn = sum(s.heads * self.costs.head[s.index] + s.kv_heads * self.costs.kv[s.index]
                           for s in self._head_sites())
                mlp = sum(s.width * self.costs.neuron[s.index] for s in self._mlp_sites())
                # the same fraction from attention and MLP; heads are coarse, so never past the remaining budget
                share = remaining * attn / (attn + mlp) if attn + mlp else 0
                self._choose_heads(share, "params", remaining)
            if neurons_free:
                self._choose_neurons(goal - self.removed, "params")
            else:
                self._choose_heads(goal - self.removed, "params", float("inf"))
                self.granularity = self._head_step()
        return self._steps()

    def _head_step(self) -> int:
        """Parameters of the smallest head cut (in every layer when uniform): heads filled the target."""
        steps = [min(self.costs.head[s.index], self.costs.kv[s.index] or self.costs.head[s.index])
                 for s in self._head_sites()]
        if not steps:
            return 0
        return sum(steps) if self.uniform else max(steps)

    def _steps(self) -> list[dict]:
        steps: list[dict] = []
        heads_removed, groups_removed, neurons_removed = {}, {}, {}
        for site in self.layout.layers:
            st = self.heads.get(site.index)
            if st is not None:
                g = site.group_size
                removed = set(st.removed)
                groups = [grp for grp in range(site.kv_heads) if set(range(grp * g, (grp + 1) * g)) <= removed]
                rest = sorted(removed - {h for grp in groups for h in range(grp * g, (grp + 1) * g)})
                if g == 1:  # one head per group (GPT-2, MHA): heads and groups are the same thing
                    groups, rest = [], sorted(removed)
                if groups:
                    steps.append({"op": "prune_kv_groups", "layer": site.index, "groups": groups})
                if rest:
                    steps.append({"op": "prune_heads", "layer": site.index, "heads": rest})
                heads_removed[site.index] = len(removed)
                groups_removed[site.index] = site.kv_heads - st.m
            if self.neurons.get(site.index):
                steps.append({"op": "prune_neurons", "layer": site.index, "neurons": self.neurons[site.index]})
                neurons_removed[site.index] = len(self.neurons[site.index])
            for path in site.linears:
                if self.ranks and path in self.ranks.ranks:
                    steps.append({"op": "low_rank", "module": path, "rank": self.ranks.ranks[path]})
        if self.dropped:
            steps.append({"op": "drop_layers", "layers": self.dropped})
        self.summary = {
            "layers_dropped": self.dropped,
            "heads_removed": heads_removed,
            "kv_groups_removed": groups_removed,
            "neurons_removed": neurons_removed,
            "low_rank": dict(self.ranks.ranks) if self.ranks else {},
            "low_rank_skipped": list(self.ranks.skipped) if self.ranks else [],
        }
        if self.ranks is not None and self.used.get("ranks") == "sv_grad":
            self.summary["low_rank_choice"] = gradient_summary(self.ranks)
        return steps
