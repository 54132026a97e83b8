"""How each output tensor of a structural plan is made from slices of the input checkpoint: data, no weights.

A structural cut only ever keeps some rows and/or columns of a stored tensor (and renumbers layers), so every
output tensor is one `TensorRead`: a source tensor, the rows and columns it keeps, and the dtype to write. The one
exception, low rank, factorises such a read (`LowRankFactor`). Which rows a cut keeps comes from the same tables the
in-memory ops use (`surgery.selections.attention_selections` / `mlp_selections`), so both paths cut the same features.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

import numpy as np

from surgery.errors import UserError
from surgery.resolve import LayerCut, Resolution
from surgery.selections import Selections, attention_selections, mlp_selections
from surgery.stream.source import ST_FLOATS, ST_ITEMSIZE, SourceTensor

# an output tensor before its source is known: (safetensors dtype, shape), by state-dict name
OutputState = dict[str, tuple[str, tuple[int, ...]]]
# the most bytes one read or one output buffer holds (unless one row is bigger): small enough to stay in a core's
# L2 cache between the read, the write and the hash; measured here, 16 MB buffers made every write() and the
# sha256 cost ~1.5-4x more CPU per byte than 1 MB ones (the data came from memory instead of the cache)
CHUNK = 1024 * 1024
# a gap of dropped rows this small is read through (into a scratch buffer) rather than skipped: a neuron cut keeps
# thousands of short runs of rows (16,496 for the demo's 80% plan, fp32 rows of 2.3 KB; ~1,760 per gate/up of a 7B
# plan, bf16 rows of 8 KB with gaps of 1-3 rows), and one read per run costs more than copying the few extra bytes
GAP_BYTES = 16 * 1024


def int64_indices(kept) -> np.ndarray:
    """An index selection (array('q') / Indices, read without a copy, or a list) as an int64 numpy array."""
    return np.frombuffer(kept, dtype=np.int64) if isinstance(kept, array) else np.asarray(kept, dtype=np.int64)


def _run_array(rows, n_rows: int) -> np.ndarray:
    """Kept indices (ascending) as an (n, 2) int64 array of [start, stop) runs (all of 0..n_rows when None)."""
    if rows is None:
        return np.array([[0, n_rows]], dtype=np.int64) if n_rows else np.zeros((0, 2), dtype=np.int64)
    r = int64_indices(rows)
    if not len(r):
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(r) != 1) + 1  # vectorised: a 70B plan has ~7 million kept indices
    starts = r[np.concatenate(([0], breaks))]
    stops = r[np.concatenate((breaks - 1, [len(r) - 1]))] + 1
    return np.stack([starts, stops], axis=1)


def read_groups(rows, n_rows: int, row_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """How a row selection is read: the kept runs (n, 2), and for each run the index of its group, a stretch of
    runs read as one contiguous range because the gaps between them are at most GAP_BYTES (read through)."""
    runs = _run_array(rows, n_rows)
    gap_rows = GAP_BYTES // max(row_bytes, 1)
    new_group = np.ones(len(runs), dtype=bool)
    new_group[1:] = runs[1:, 0] - runs[:-1, 1] > gap_rows
    return runs, np.cumsum(new_group) - 1


def group_spans(runs: np.ndarray, group: np.ndarray) -> np.ndarray:
    """(g, 2) [first row, end row) of each group of `read_groups`."""
    if not len(runs):
        return np.zeros((0, 2), dtype=np.int64)
    first = np.flatnonzero(np.diff(group, prepend=-1))
    last = np.append(first[1:], len(runs)) - 1
    return np.stack([runs[first, 0], runs[last, 1]], axis=1)


def rows_touched(rows, n_rows: int, row_bytes: int) -> int:
    """Rows a selection reads: the kept ones and the gaps read through (`read_groups`)."""
    spans = group_spans(*read_groups(rows, n_rows, row_bytes))
    return int((spans[:, 1] - spans[:, 0]).sum())


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

    `source` is None for a zero-length placeholder or a low-rank factor (`factor`). Kept indices are int64 arrays,
    not tuples of ints: a 70B plan keeps ~7 million of them, 10x less memory this way.
    """

    name: str
    dtype: str  # safetensors name, "BF16"
    shape: tuple[int, ...]
    source: str | None = None
    rows: array | None = None
    cols: array | None = None
    factor: LowRankFactor | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_ITEMSIZE[self.dtype]

    def bytes_read(self, sources: dict[str, SourceTensor]) -> int:
        """Input bytes this read touches: whole rows (a column cut reads its rows in full), and the small gaps
        between kept rows that are read through (`read_groups`)."""
        if self.factor is not None:
            return self.factor.weight.bytes_read(sources) if self.factor.part == "a" else 0
        if self.source is None:
            return 0
        src = sources[self.source]
        n_rows = src.shape[0] if src.shape else 1
        return rows_touched(self.rows, n_rows, src.row_bytes) * src.row_bytes


def layer_selections(cut: LayerCut, spec) -> dict[str, tuple[array | None, array | None]]:
    """{layer-relative Linear path ("self_attn.q_proj"): (kept outputs, kept inputs)} for one kept layer, each index
    list as one array shared by every projection that keeps it (gate, up and down keep the same neurons)."""
    s = cut.shape
    sel: Selections = {}
    if cut.attention_kept and cut.heads:
        cuts = attention_selections(spec, cut.kept_heads, cut.kept_groups, s.heads, s.kv_heads, s.head_dim)
        sel.update({f"{spec.attn}.{name}": v for name, v in cuts.items()})
    if cut.mlp_kept and cut.neurons:
        sel.update({f"{spec.mlp}.{name}": v for name, v in mlp_selections(spec, cut.kept_neurons, s.mlp).items()})
    packed: dict[int, array] = {}

    def pack(v):
        if v is None:
            return None
        if id(v) not in packed:
            packed[id(v)] = array("q", v)
        return packed[id(v)]

    return {name: (pack(outputs), pack(inputs)) for name, (outputs, inputs) in sel.items()}


def _linear_read(name: str, dtype, shape, source: str, param: str, sel, conv1d: bool) -> TensorRead:
    """A Linear's weight or bias with its (outputs, inputs) selection, in storage layout (Conv1D is (in, out))."""
    outputs, inputs = sel if sel else (None, None)
    if param == "bias":
        rows, cols = outputs, None
    else:
        rows, cols = (inputs, outputs) if conv1d else (outputs, inputs)
    return TensorRead(name, dtype, shape, source, rows, cols)


def tensor_reads(state: OutputState, resolution: Resolution, sources: dict[str, SourceTensor]) -> dict[str, TensorRead]:
    """The read behind every tensor of `state` (what the pruned model saves: the state dict of the model on the
    meta device with tied copies removed, or `surgery.stream.layout`'s derivation of it), checked against the
    input's shapes.

    Raises:
        NotStreamable: An output tensor has no source of the right shape or dtype.
    """
    spec = resolution.shape.spec
    kept = [c.index for c in resolution.kept_layers]
    prefix = spec.layers + "."
    selections: dict[int, dict] = {}
    reads: dict[str, TensorRead] = {}
    for name, (dtype, shape) in state.items():
        if math.prod(shape) == 0:  # a placeholder (surgery.modules): zero bytes, whatever it replaced
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
    if src.dtype != read.dtype and not (src.dtype in ST_FLOATS and read.dtype in ST_FLOATS):
        raise NotStreamable(f"{read.name}: stored as {src.dtype}, written as {read.dtype}")
    shape = list(src.shape)
    for dim, kept in ((0, read.rows), (1, read.cols)):
        if kept is not None:
            if len(shape) <= dim or (kept and max(kept) >= shape[dim]):
                raise NotStreamable(f"{read.name}: the cut does not fit {read.source} {list(src.shape)}")
            shape[dim] = len(kept)
    if read.factor is None and read.shape and tuple(shape) != read.shape:
        raise NotStreamable(f"{read.name}: {read.source} {list(src.shape)} cut to {shape}, expected {list(read.shape)}")
