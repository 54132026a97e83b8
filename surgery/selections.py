"""Which rows and columns each projection keeps under a head or neuron cut: index lists only, no tensors.

Torch-free so that the streaming applier's dry run (surgery.stream) can plan its reads without importing torch;
`surgery.ops` applies the same tables to live modules.
"""

from __future__ import annotations

from collections.abc import Sequence

from surgery.arch.base import ArchSpec


def head_rows(heads: Sequence[int], head_dim: int, offset: int = 0) -> list[int]:
    """Feature positions of `heads` in a projection laid out head after head."""
    return [offset + h * head_dim + j for h in heads for j in range(head_dim)]


Selections = dict[str, tuple[list[int] | None, list[int] | None]]


def attention_selections(
    spec: ArchSpec, keep_q: Sequence[int], keep_kv: Sequence[int], n_q: int, n_kv: int, head_dim: int
) -> Selections:
    """The features each attention projection keeps when heads `keep_q` and KV heads `keep_kv` stay.

    The one source of truth for head cuts: the in-memory op and the streaming applier (surgery.stream) both read it.
    """
    q_rows = head_rows(keep_q, head_dim)
    kv_rows = head_rows(keep_kv, head_dim)
    if spec.qkv:
        # rows (or Conv1D columns) are [q: n_q*hd | k: n_kv*hd | v: n_kv*hd]
        k_off, v_off = n_q * head_dim, (n_q + n_kv) * head_dim
        sel: Selections = {spec.qkv: (q_rows + [k_off + r for r in kv_rows] + [v_off + r for r in kv_rows], None)}
    else:
        sel = {spec.q: (q_rows, None), spec.k: (kv_rows, None), spec.v: (kv_rows, None)}
    sel[spec.o] = (None, q_rows)
    return sel


def mlp_selections(spec: ArchSpec, keep: Sequence[int], width: int) -> Selections:
    """The features each MLP projection keeps when neurons `keep` stay (fused gate_up: [gate | up] rows)."""
    keep = list(keep)
    if spec.gate_up:
        sel: Selections = {spec.gate_up: (keep + [width + i for i in keep], None)}
    else:
        sel = {spec.gate: (keep, None)} if spec.gate else {}
        sel[spec.up] = (keep, None)
    sel[spec.down] = (None, keep)
    return sel
