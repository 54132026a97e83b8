"""Low-rank suggestions for `surgery.suggest`: per matrix, the rank that keeps a fraction of the spectrum energy.

For a Linear with singular values s_1 >= s_2 >= ... (`sv` by default; or `sv_act`, the spectrum of
W diag(rms)), the energy of the top r components is sum_{i <= r} s_i^2 (the squared Frobenius norm they carry).
The suggested rank is the smallest r whose energy reaches `keep` of the total. With `sv` that is exactly the
share of ||W||_F^2 the plain truncated SVD of `surgery.ops.low_rank` keeps (Eckart-Young). `sv_act` describes an
activation-aware factorisation (of W diag(rms)), which `low_rank` does not perform, so it is only used when asked
for. On the demo, low rank without recovery was ruinous with either spectrum (docs/scoring.md). `low_rank` replaces the Linear by two factors of r * (in + out) weights, so a rank at
or above the break-even out * in / (out + in) saves nothing: such matrices get no step.

Which matrices: families of Linears, "attn" (every attention projection), "mlp" (every MLP projection), the
Linears' own names ("down_proj", "o_proj", GPT-2 "c_fc", ...) or their layer-relative paths ("mlp.c_proj", for
GPT-2 whose attention and MLP both have a "c_proj"). A block with a factorised matrix is not pruned
(heads for attention, neurons for the MLP) anywhere in the model, so every rank applies to the matrix the scores
describe and the parameter count of every other step stays as computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from surgery.errors import UserError
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
    matched: set[str] = set()
    for site in sites:
        for path, module in site.linears.items():
            block, selected_by = _matches(site, path, names)
            if not selected_by:
                continue
            matched.update(selected_by)
            choice.blocks.add(block)
            out_f, in_f = weight_out_in(module, layout.conv1d).shape
            rank = energy_rank(spectrum(path, min(out_f, in_f)), keep)
            if rank * (out_f + in_f) >= out_f * in_f:  # at or past break-even: factors are not smaller
                choice.skipped.append(path)
                continue
            choice.ranks[path] = rank
            choice.removed += out_f * in_f - rank * (out_f + in_f)
    unknown = [n for n in names if n not in matched]
    if unknown:
        known = sorted({p.rpartition(".")[2] for s in sites for p in s.linears})
        raise UserError(f"--low-rank {','.join(unknown)}: no such Linear (use attn, mlp or {', '.join(known)})")
    return choice
