"""Low-rank suggestions for `surgery.suggest`: per matrix, the rank that keeps a fraction of the spectrum energy.

For a Linear with singular values s_1 >= s_2 >= ... (`sv` by default; or `sv_act`, the spectrum of
W diag(rms)), the energy of the top r components is sum_{i <= r} s_i^2 (the squared Frobenius norm they carry).
The suggested rank is the smallest r whose energy reaches `keep` of the total. With `sv` that is exactly the
share of ||W||_F^2 the plain truncated SVD of `surgery.ops.low_rank` keeps (Eckart-Young). `sv_act` describes an
activation-aware factorisation (of W diag(rms)), which `low_rank` does not perform, so it is only used when asked
for. On the demo, low rank without recovery was ruinous with either spectrum (docs/scoring.md). `low_rank` replaces the Linear by two factors of r * (in + out) weights, so a rank at
or above the break-even out * in / (out + in) saves nothing: such matrices get no step.

With `sv_grad` (the gradient of each singular value, dL/dsigma_i = u_i^T (dL/dW) v_i, Compress to Impress) the
choice is global instead (`gradient_ranks`): for a parameter budget, which matrices to factorise and at which ranks,
by the first-order estimate of the loss change |sigma_i * dL/dsigma_i| summed over the singular values each rank
drops. The estimate is in the basis of W's own SVD, which is what the plain factorisation truncates; for whitened /
asvd factorisations it is a proxy that only decides how many components each matrix keeps.

Which matrices: families of Linears, "attn" (every attention projection), "mlp" (every MLP projection), the
Linears' own names ("down_proj", "o_proj", GPT-2 "c_fc", ...) or their layer-relative paths ("mlp.c_proj", for
GPT-2 whose attention and MLP both have a "c_proj"). A block with a factorised matrix is not pruned
(heads for attention, neurons for the MLP) anywhere in the model, so every rank applies to the matrix the scores
describe and the parameter count of every other step stays as computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from surgery.errors import UserError
from surgery.importance.hull import lower_hull
from surgery.importance.layout import LayerSite, ModelLayout, weight_out_in

BLOCKS = ("attn", "mlp")


def parse_low_rank(text: str) -> tuple[str, ...]:
    """"mlp", "attn,mlp" or Linear names ("down_proj,o_proj") -> a tuple; anything else is a UserError."""
    names = tuple(dict.fromkeys(p.strip() for p in str(text).split(",") if p.strip()))
    if not names or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", n) for n in names):
        raise UserError(f"--low-rank {text!r}: expected attn, mlp or Linear names, comma-separated (e.g. mlp)")
    return names


def check_keep(keep: float) -> float:
    """`--rank-keep` must be a fraction of the energy in (0, 1): 1 keeps every component (no saving)."""
    if not 0 < keep < 1:
        raise UserError(f"--rank-keep {keep}: expected the fraction of spectrum energy kept, in (0, 1), e.g. 0.9")
    return float(keep)


def energy_rank(values: torch.Tensor, keep: float) -> int:
    """The smallest r with sum of the top-r squared values >= keep * the sum of all squared values.

    Args:
        values: singular values (any order; sorted descending here), (n,).
        keep: the fraction of energy kept, in (0, 1).
    """
    energy = values.double().sort(descending=True).values.pow(2)  # (n,)
    total = float(energy.sum())
    if total <= 0:
        return 1
    cum = energy.cumsum(0) / total
    return min(int((cum < keep).sum()) + 1, energy.numel())


@dataclass
class RankChoice:
    """The suggested factorisations: full path -> rank, and what they save."""

    ranks: dict[str, int]
    removed: int  # parameters saved, sum of out * in - r * (out + in)
    skipped: list[str]  # matrices whose rank for `keep` would not save anything
    blocks: set[str]  # "attn" / "mlp": blocks the names select (not pruned, even where no rank saves anything)
    # gradient_ranks only: per chosen matrix the estimated loss change of its dropped singular values, the selected
    # matrices left dense, the parameter budget and how many singular values were dropped
    estimate: dict[str, float] = field(default_factory=dict)
    spared: list[str] = field(default_factory=list)
    budget: int = 0
    dropped_values: int = 0
    last_step: int = 0  # parameters saved by the last hull segment taken: how far past the budget it may land


def _matches(site: LayerSite, path: str, names: tuple[str, ...]) -> tuple[str, list[str]]:
    """The block ("attn" / "mlp") of a Linear, and which of `names` select it: the block, the Linear's name
    ("c_proj": GPT-2 has one in each block) or its layer-relative path ("mlp.c_proj")."""
    block = "attn" if site.attn_path and path.startswith(site.attn_path + ".") else "mlp"
    relative = path[len(site.path) + 1:]  # "mlp.down_proj"
    return block, [n for n in names if n in (block, relative, relative.rpartition(".")[2])]


def choose_ranks(layout: ModelLayout, sites: list[LayerSite], names: tuple[str, ...], keep: float,
                 spectrum) -> RankChoice:
    """Ranks for the selected Linears of `sites` (the kept layers).

    Args:
        layout: the model's layout (meta model: shapes only).
        sites: the layers to consider.
        names: families / Linear names (see parse_low_rank).
        keep: fraction of the spectrum energy kept per matrix.
        spectrum: path, size -> the singular values to use for that Linear (raises UserError when missing).

    Raises:
        UserError: a name selects no Linear of the model.
    """
    choice = RankChoice({}, 0, [], set())
    for path, block, out_f, in_f in selected_linears(layout, sites, names):
        choice.blocks.add(block)
        rank = energy_rank(spectrum(path, min(out_f, in_f)), keep)
        if rank >= break_even(out_f, in_f):  # factors would not be smaller
            choice.skipped.append(path)
            continue
        choice.ranks[path] = rank
        choice.removed += out_f * in_f - rank * (out_f + in_f)
    return choice


def selected_linears(layout: ModelLayout, sites: list[LayerSite], names: tuple[str, ...]
                     ) -> list[tuple[str, str, int, int]]:
    """(full path, block, out, in) of every Linear of `sites` that `names` select.

    Raises:
        UserError: a name selects no Linear of the model.
    """
    found, matched = [], set()
    for site in sites:
        for path, module in site.linears.items():
            block, selected_by = _matches(site, path, names)
            if selected_by:
                matched.update(selected_by)
                found.append((path, block, *weight_out_in(module, layout.conv1d).shape))
    unknown = [n for n in names if n not in matched]
    if unknown:
        known = sorted({p.rpartition(".")[2] for s in sites for p in s.linears})
        raise UserError(f"--low-rank {','.join(unknown)}: no such Linear (use attn, mlp or {', '.join(known)})")
    return found


def break_even(out_f: int, in_f: int) -> int:
    """The smallest rank whose two factors, r * (out + in) weights, are not smaller than the out * in matrix."""
    return -(-out_f * in_f // (out_f + in_f))


def loss_estimates(sv: torch.Tensor, sv_grad: torch.Tensor) -> torch.Tensor:
    """|sigma_i * dL/dsigma_i|: the first-order estimate of the loss change when sigma_i is set to zero (float64)."""
    return (sv.double() * sv_grad.double()).abs()


def rank_options(estimate: torch.Tensor, out_f: int, in_f: int) -> list[tuple[int, int, float]]:
    """(rank, parameters saved, estimated loss change) of every rank that saves parameters, plus (full, 0, 0).

    A rank-r truncation drops the singular values r+1.. (in the factorisation's own order, largest first), so its
    estimate is the sum of theirs.
    """
    n = estimate.numel()
    tail = estimate.flip(0).cumsum(0).flip(0).tolist() + [0.0]  # tail[r] = sum of estimate[r:]
    options = [(n, 0, 0.0)]
    for r in range(min(break_even(out_f, in_f), n + 1) - 1, 0, -1):
        options.append((r, out_f * in_f - r * (out_f + in_f), tail[r]))
    return options


def gradient_ranks(layout: ModelLayout, sites: list[LayerSite], names: tuple[str, ...], budget: int,
                   spectrum) -> RankChoice:
    """Which of the selected Linears to factorise, and at which ranks, to remove at least `budget` parameters at
    the lowest estimated loss change (Compress to Impress's singular-value gradients, allocated globally).

    Per matrix the options are its ranks (`rank_options`); their lower convex hulls are walked across all matrices
    in order of estimated loss per parameter saved, whole hull segments at a time, until the budget is met. Why
    this is sound: the result minimises estimate - lambda * saved for the price lambda of the last segment taken,
    so no other choice of ranks that saves at least as many parameters has a lower summed estimate. It may pass
    the budget by up to that last segment.

    Args:
        budget: parameters to remove (> 0).
        spectrum: path, size -> (sv, sv_grad) of that Linear, (size,) each, largest singular value first.

    Raises:
        UserError: a name selects no Linear; the budget exceeds what factorising every selected Linear saves.
    """
    choice = RankChoice({}, 0, [], set(), budget=budget)
    matrices, segments = [], []
    for k, (path, block, out_f, in_f) in enumerate(selected_linears(layout, sites, names)):
        choice.blocks.add(block)
        opts = rank_options(loss_estimates(*spectrum(path, min(out_f, in_f))), out_f, in_f)
        matrices.append((path, opts))
        points = [(saved, est) for _, saved, est in opts]
        hull = lower_hull(points)
        for j in range(1, len(hull)):
            (a1, c1), (a2, c2) = points[hull[j - 1]], points[hull[j]]
            segments.append(((c2 - c1) / (a2 - a1), k, j, hull[j]))
    reachable = sum(opts[-1][1] for _, opts in matrices if len(opts) > 1)
    if reachable < budget:
        raise UserError(f"low rank can remove at most {reachable:,} parameters from the --low-rank matrices (every "
                        f"one at rank 1); the target asks {budget:,}: lower it or select more matrices")
    picked: dict[int, int] = {}
    removed = 0
    for _, k, _, vertex in sorted(segments):
        if removed >= budget:
            break
        before = matrices[k][1][picked.get(k, 0)][1]
        picked[k] = vertex
        choice.last_step = matrices[k][1][vertex][1] - before
        removed += choice.last_step
    for k, (path, opts) in enumerate(matrices):
        if k not in picked:
            choice.spared.append(path)
            continue
        rank, saved, est = opts[picked[k]]
        choice.ranks[path], choice.estimate[path] = rank, est
        choice.removed += saved
        choice.dropped_values += opts[0][0] - rank
    return choice


def gradient_summary(choice: RankChoice) -> dict:
    """What `gradient_ranks` chose and why, for `plan suggest`'s summary (JSON-ready)."""
    return {
        "metric": "sv_grad",
        "estimate": "sum over dropped singular values of |sigma_i * dL/dsigma_i| (first-order loss change)",
        "budget": choice.budget,
        "removed": choice.removed,
        "considered": len(choice.ranks) + len(choice.spared),
        "chosen": len(choice.ranks),
        "dropped_values": choice.dropped_values,
        "estimated_loss_change": sum(choice.estimate.values()),
        "matrices": {p: {"rank": r, "estimate": choice.estimate[p]} for p, r in choice.ranks.items()},
        "spared": list(choice.spared),
    }
