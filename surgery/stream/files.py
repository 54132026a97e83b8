"""The output files of a streaming apply, known before any weight byte is read: torch-free.

From the output state (name -> dtype, shape) and the reads behind it: the shards `save_pretrained` would make (same
split, same tensor order, same header bytes), their exact sizes, the shard index, and the plan of reads that
`workbench apply --dry-run` prints. The meta-device path (surgery.stream.apply) and the header-only path
(surgery.stream.layout) both end here, so they cannot disagree on anything but the output state itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from surgery.resolve import Resolution
from surgery.stream.reads import OutputState, TensorRead, tensor_reads
from surgery.stream.source import ST_ITEMSIZE, TORCH_NAMES, SourceTensor

INDEX_NAME = "model.safetensors.index.json"
METADATA = {"format": "pt"}  # what save_pretrained passes to safetensors


def _empty_specs(reads: list[TensorRead]) -> dict[str, Any]:
    """Zero-length stand-ins of `reads` in the form safetensors' own serializer takes (0.8: TensorSpec)."""
    try:
        from safetensors import TensorSpec
    except ImportError:  # older safetensors: plain dicts
        return {r.name: {"dtype": TORCH_NAMES[r.dtype], "shape": [0], "data": b""} for r in reads}
    return {r.name: TensorSpec(dtype=TORCH_NAMES[r.dtype], shape=[0], data_ptr=0, data_len=0) for r in reads}


def file_order(reads: list[TensorRead]) -> list[TensorRead]:
    """The order safetensors lays tensors out in a file (by dtype, then name), asked of safetensors itself with
    zero-length stand-ins, so a later safetensors that sorts otherwise is followed, not guessed."""
    from safetensors import serialize

    raw = bytes(serialize(_empty_specs(reads), None))
    n = int.from_bytes(raw[:8], "little")
    names = [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]
    by_name = {r.name: r for r in reads}
    return [by_name[k] for k in names]


def header_bytes(ordered: list[TensorRead]) -> bytes:
    """8-byte length + the JSON header (compact, metadata first, space-padded to 8 bytes), as safetensors writes."""
    header: dict = {"__metadata__": METADATA}
    offset = 0
    for r in ordered:
        header[r.name] = {"dtype": r.dtype, "shape": list(r.shape), "data_offsets": [offset, offset + r.nbytes]}
        offset += r.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def split_like_save_pretrained(state: OutputState, max_shard_size: str):
    """The shards `save_pretrained` makes (huggingface_hub's split, same state-dict order) of the model whose
    saved tensors `state` describes."""
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

    def storage_id(entry):
        # on the CPU every zero-length tensor has data pointer 0, so huggingface_hub sees all placeholders as one
        # shared storage (and puts them into the first one's shard); any other tensor has its own
        return ("cpu", 0, 0) if math.prod(entry[1]) == 0 else None

    return split_state_dict_into_shards_factory(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size,
        get_storage_size=lambda e: math.prod(e[1]) * ST_ITEMSIZE[e[0]], get_storage_id=storage_id,
    )  # fmt: skip


@dataclass
class Shard:
    """One output safetensors file: its tensors in file order, and its exact size."""

    name: str
    tensors: list[TensorRead]

    @property
    def nbytes(self) -> int:
        return len(header_bytes(self.tensors)) + sum(t.nbytes for t in self.tensors)


@dataclass
class StreamPlan:
    """Everything the writer needs, known before any weight byte is read."""

    sources: dict[str, SourceTensor]
    shards: list[Shard]
    index: dict | None  # model.safetensors.index.json when sharded
    params_after: int
    model: Any = None  # the pruned model on the meta device, config rewritten (None for a header-only plan)
    planned_by: str = "meta-device model"  # or "headers" (surgery.stream.layout: no torch, no model)
    notes: list[str] = field(default_factory=list)  # why the meta-device model was needed, when it was

    @property
    def bytes_written(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @cached_property
    def read_sizes(self) -> dict[str, int]:
        """Input bytes behind each output tensor (computed once: a 70B plan walks millions of kept indices)."""
        return {t.name: t.bytes_read(self.sources) for s in self.shards for t in s.tensors}

    @property
    def bytes_read(self) -> int:
        return sum(self.read_sizes.values())

    def describe(self) -> dict:
        """The plan of reads as JSON-able data (what `workbench apply --dry-run` prints)."""
        def kept(sel, total):
            return None if sel is None else [len(sel), total]

        reads = []
        for shard in self.shards:
            for t in shard.tensors:
                src = t.factor.weight if t.factor else t
                s = self.sources.get(src.source) if src.source else None
                reads.append({
                    "name": t.name, "file": shard.name, "source": src.source,
                    "source_file": s.file.name if s else None,
                    "rows": kept(src.rows, s.shape[0]) if s and s.shape else None,
                    "cols": kept(src.cols, s.shape[1]) if s and len(s.shape) > 1 else None,
                    "low_rank": t.factor.rank if t.factor else None,
                    "dtype": t.dtype, "shape": list(t.shape),
                    "bytes_read": self.read_sizes[t.name], "bytes_written": t.nbytes,
                })  # fmt: skip
        return {
            "path": "stream",
            "planned_by": self.planned_by,
            "notes": self.notes,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "params_after": self.params_after,
            "shards": [{"file": s.name, "bytes": s.nbytes, "tensors": len(s.tensors)} for s in self.shards],
            "reads": reads,
        }


def assemble(
    state: OutputState, resolution: Resolution, sources: dict[str, SourceTensor], max_shard_size: str,
    params: int | None = None, **kw,
) -> StreamPlan:
    """The StreamPlan of an output state (in save_pretrained's order: sorted names): reads, shards, index.

    `params`: the model's parameter count (default: the elements of `state`, where tied copies are not).

    Raises:
        NotStreamable: Some output tensor has no slice of the input behind it.
    """
    reads = tensor_reads(state, resolution, sources)
    split = split_like_save_pretrained(state, max_shard_size)
    shards = [Shard(f, file_order([reads[n] for n in names])) for f, names in sorted(split.filename_to_tensors.items())]
    if params is None:
        params = sum(math.prod(shape) for _, shape in state.values())
    return StreamPlan(sources, shards, shard_index(split, params), params, **kw)


def shard_index(split, params: int) -> dict | None:
    """The `INDEX_NAME` contents of a `split_like_save_pretrained` split holding `params` parameters, as
    save_pretrained writes them (metadata.total_parameters / total_size, weight_map); None when it is one file."""
    if not split.is_sharded:
        return None
    return {"metadata": {"total_parameters": params, **split.metadata}, "weight_map": split.tensor_to_filename}


def write_index(directory: Path, index: dict) -> None:
    """`index` (a `shard_index`) written into `directory` as save_pretrained writes it."""
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
