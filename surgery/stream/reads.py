"""How each output tensor of a structural plan is made from slices of the input checkpoint: data, no weights.

A structural cut only ever keeps some rows and/or columns of a stored tensor (and renumbers layers), so every
output tensor is one `TensorRead`: a source tensor, the rows and columns it keeps, and the dtype to write. The one
exception, low rank, factorises such a read (`LowRankFactor`). Which rows a cut keeps comes from the same tables the
in-memory ops use (`surgery.ops.attention_selections` / `mlp_selections`), so both paths cut the same features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from surgery import ops
from surgery.errors import UserError
from surgery.resolve import LayerCut, Resolution
from surgery.stream.source import SourceTensor


class NotStreamable(UserError):
    """A plan or source the streaming applier cannot handle; the message names the step (or tensor) and why."""


@dataclass(frozen=True)
class LowRankFactor:
    """One factor ("a": A, r x in, or "b": B, out x r) of the truncated SVD of `weight` (storage layout)."""

    module: str  # output module path; the a and b factors of one module share one SVD
    part: str
    weight: TensorRead
    rank: int
    conv1d: bool


@dataclass(frozen=True)
class TensorRead:
    """One output tensor: `source` with only `rows` (dim 0) and `cols` (dim 1) kept, written as `dtype`.

    `source` is None for a zero-length placeholder or a low-rank factor (`factor`).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: str | None = None
    rows: tuple[int, ...] | None = None
    cols: tuple[int, ...] | None = None
    factor: LowRankFactor | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def bytes_read(self, sources: dict[str, SourceTensor]) -> int:
        """Input bytes this read touches (whole rows: a column cut reads its rows in full)."""
        if self.factor is not None:
            return self.factor.weight.bytes_read(sources) if self.factor.part == "a" else 0
        if self.source is None:
            return 0
        src = sources[self.source]
        n_rows = len(self.rows) if self.rows is not None else (src.shape[0] if src.shape else 1)
        return n_rows * src.row_bytes


def layer_selections(cut: LayerCut, spec) -> ops.Selections:
    """{layer-relative Linear path ("self_attn.q_proj"): (kept outputs, kept inputs)} for one kept layer."""
    s = cut.shape
    sel: ops.Selections = {}
    if cut.attention_kept and cut.heads:
        cuts = ops.attention_selections(spec, cut.kept_heads, cut.kept_groups, s.heads, s.kv_heads, s.head_dim)
        sel.update({f"{spec.attn}.{name}": v for name, v in cuts.items()})
    if cut.mlp_kept and cut.neurons:
        sel.update({f"{spec.mlp}.{name}": v for name, v in ops.mlp_selections(spec, cut.kept_neurons, s.mlp).items()})
    return sel


def _linear_read(name: str, dtype, shape, source: str, param: str, sel, conv1d: bool) -> TensorRead:
    """A Linear's weight or bias with its (outputs, inputs) selection, in storage layout (Conv1D is (in, out))."""
    outputs, inputs = sel if sel else (None, None)
    if param == "bias":
        rows, cols = outputs, None
    else:
        rows, cols = (inputs, outputs) if conv1d else (outputs, inputs)
    as_tuple = lambda v: None if v is None else tuple(v)  # noqa: E731
    return TensorRead(name, dtype, shape, source, as_tuple(rows), as_tuple(cols))


def tensor_reads(
    state: dict[str, torch.Tensor], resolution: Resolution, sources: dict[str, SourceTensor]
) -> dict[str, TensorRead]:
    """The read behind every tensor of `state` (the pruned model's state dict on the meta device, tied copies
    removed), checked against the input's shapes.

    Raises:
        NotStreamable: An output tensor has no source of the right shape or dtype.
    """
    spec = resolution.shape.spec
    kept = [c.index for c in resolution.kept_layers]
    prefix = spec.layers + "."
    selections: dict[int, ops.Selections] = {}
    reads: dict[str, TensorRead] = {}
    for name, t in state.items():
        dtype, shape = t.dtype, tuple(t.shape)
        if t.numel() == 0:  # a placeholder (surgery.modules): zero bytes, whatever it replaced
            reads[name] = TensorRead(name, dtype, shape)
            continue
        if not name.startswith(prefix):
            reads[name] = TensorRead(name, dtype, shape, name)
            continue
        position, rest = name[len(prefix) :].split(".", 1)
        cut = resolution.layers[kept[int(position)]]
        src_prefix = f"{prefix}{cut.index}."
        if cut.index not in selections:  # once per layer: kept_neurons walks the layer's whole width
            selections[cut.index] = layer_selections(cut, spec)
        sel = selections[cut.index]
        module, param = rest.rsplit(".", 1)
        rel, _, part = module.rpartition(".")
        if rel in cut.low_rank and part in ("a", "b"):
            if param == "bias":  # the Linear's bias moves to b, cut like the Linear's outputs
                reads[name] = _linear_read(name, dtype, shape, f"{src_prefix}{rel}.bias", "bias", sel.get(rel), False)
            else:
                w = _linear_read(name, dtype, (), f"{src_prefix}{rel}.weight", "weight", sel.get(rel), spec.conv1d)
                factor = LowRankFactor(f"{prefix}{position}.{rel}", part, w, cut.low_rank[rel], spec.conv1d)
                reads[name] = TensorRead(name, dtype, shape, factor=factor)
        elif module in sel:
            reads[name] = _linear_read(name, dtype, shape, src_prefix + rest, param, sel[module], spec.conv1d)
        else:
            reads[name] = TensorRead(name, dtype, shape, src_prefix + rest)
    for read in reads.values():
        _check(read.factor.weight if read.factor else read, sources)
    return reads


def _check(read: TensorRead, sources: dict[str, SourceTensor]) -> None:
    if read.source is None:
        return
    src = sources.get(read.source)
    if src is None:
        raise NotStreamable(f"{read.name}: no tensor {read.source!r} in the input checkpoint")
    if src.dtype != read.dtype and not (src.dtype.is_floating_point and read.dtype.is_floating_point):
        raise NotStreamable(f"{read.name}: stored as {src.dtype}, written as {read.dtype}")
    shape = list(src.shape)
    for dim, kept in ((0, read.rows), (1, read.cols)):
        if kept is not None:
            if len(shape) <= dim or (kept and max(kept) >= shape[dim]):
                raise NotStreamable(f"{read.name}: the cut does not fit {read.source} {list(src.shape)}")
            shape[dim] = len(kept)
    if read.factor is None and read.shape and tuple(shape) != read.shape:
        raise NotStreamable(f"{read.name}: {read.source} {list(src.shape)} cut to {shape}, expected {list(read.shape)}")
