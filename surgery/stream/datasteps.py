"""Streaming apply of plans with data-driven steps (reconstruct, whitened / asvd low rank): the steps are fitted
layer by layer (`surgery.reconstruct_layerwise`) and the tensors they compute are spilled to a temporary
safetensors file per block, which the plan of reads names as one more input file.

Why a spill: the writer lays out each output shard from slices of files (surgery.stream.writer) in the order
save_pretrained writes them (a shard holds tensors of many layers, sorted by name), which is not the order the fit
visits layers in, and the fit frees each block once it is done. So each fitted block's computed tensors (refit
o_proj / down_proj, low-rank factors) go to `<tmp>/.spill/layer-N.safetensors` as soon as the block is final,
the writer streams them back from there like any input slice, and every other tensor still comes from the input.
Memory stays one block (+ the hidden states of the calibration tokens), the writer is unchanged, and the bytes are
the ones the fit computed: byte-identical to the in-memory apply (tests/test_stream_datasteps.py).

The spill lives inside the output's atomic temporary directory: on the output's disk (the free-space check counts
it), deleted once the shards are written, and removed with everything else when anything fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from pathlib import Path

import torch
from torch import nn

from surgery.data import TokenBlocks
from surgery.resolve import Resolution
from surgery.stream.files import METADATA, Shard, StreamPlan, file_order, header_bytes
from surgery.stream.fitted import spill_groups
from surgery.stream.reads import NotStreamable, TensorRead
from surgery.stream.source import SourceTensor, file_tensors
from surgery.stream.writer import torch_dtype

if TYPE_CHECKING:  # imported lazily at run time (see run_layerwise_fit)
    from surgery.reconstruct_layerwise import BlockDone

SPILL_DIR = ".spill"  # hidden: the final fsync pass skips dot names, and it is gone before then anyway
SPILL_KEY = "spill/"  # prefix of a spilled tensor's key in `sources`, apart from the input's tensor names
# the kind of apply the manifest records for plans whose data steps ran here (surgery.json "apply.data_steps")
LAYER_BY_LAYER = "layer_by_layer"

Progress = Callable[[str], None]


def spill_file(spill_dir: Path, position: int) -> Path:
    return spill_dir / f"layer-{position:05d}.safetensors"


def spill_bytes(groups: dict[int, list[TensorRead]]) -> int:
    """The exact size of the spill files (header + data each), for the free-space check."""
    return sum(len(header_bytes(reads)) + sum(r.nbytes for r in reads) for reads in groups.values())


def redirect(splan: StreamPlan, groups: dict[int, list[TensorRead]], spill_dir: Path) -> StreamPlan:
    """`splan` with every fitted tensor read whole from its spill file in `spill_dir` instead of cut from the
    input. The offsets are where safetensors puts each tensor (`header_bytes`, `file_order`: what the writer
    also relies on); `Spill.save` checks them against the file actually written."""
    sources = dict(splan.sources)
    replaced: dict[str, TensorRead] = {}
    for position, reads in groups.items():
        path = spill_file(spill_dir, position)
        offset = len(header_bytes(reads))
        for r in reads:
            key = SPILL_KEY + r.name
            sources[key] = SourceTensor(path, offset, r.dtype, r.shape)
            replaced[r.name] = TensorRead(r.name, r.dtype, r.shape, key)
            offset += r.nbytes
    shards = [Shard(s.name, [replaced.get(t.name, t) for t in s.tensors]) for s in splan.shards]
    return dataclasses.replace(splan, sources=sources, shards=shards)


class SpilledFit:
    """The spill of one streaming apply: which tensors the fit computes, where they go, the plan that reads them."""

    def __init__(self, splan: StreamPlan, resolution: Resolution) -> None:
        self.layers_path = resolution.shape.spec.layers
        self.structural = splan
        self.groups = spill_groups(splan, resolution)
        # the plan as the free-space check and the manifest see it (sizes and reads are exact; the spill's
        # directory is only known once the output's temporary directory exists: `fitted` re-points it)
        self.plan = redirect(splan, self.groups, Path(SPILL_DIR))
        self.spill_bytes = spill_bytes(self.groups)

    def _save(self, plan: StreamPlan, position: int, block: nn.Module) -> None:
        """`on_block` of the layerwise fit: the final block's fitted tensors to its spill file."""
        from safetensors.torch import save_file

        reads = self.groups.get(position)
        if not reads:
            return
        state = block.state_dict()
        prefix = f"{self.layers_path}.{position}."
        tensors: dict[str, torch.Tensor] = {}
        for r in reads:
            t = state[r.name[len(prefix) :]]
            if tuple(t.shape) != r.shape or t.dtype != torch_dtype(r.dtype):
                raise RuntimeError(f"{r.name}: fitted as {t.dtype} {list(t.shape)}, planned as {r.dtype} "
                                   f"{list(r.shape)}")
            tensors[r.name] = t.contiguous()
        path = plan.sources[SPILL_KEY + reads[0].name].file
        save_file(tensors, str(path), metadata=METADATA)
        # a wrong offset would silently stream wrong bytes: the planned layout is checked against the real one
        written = file_tensors(path)
        if any(written.get(r.name) != plan.sources[SPILL_KEY + r.name] for r in reads):
            raise RuntimeError(f"{path}: the tensors are not where the plan of reads expects them")

    @contextlib.contextmanager
    def fitted(self, tmp: Path, fit: Callable[[BlockDone], None]) -> Iterator[StreamPlan]:
        """Run `fit(on_block)` spilling into `tmp`, then yield the plan of reads that streams from the spill; the
        spill is deleted on exit (after the writer is done, or on a failure, when atomic_dir would remove it with
        `tmp` anyway)."""
        spill_dir = tmp / SPILL_DIR
        spill_dir.mkdir()
        try:
            plan = redirect(self.structural, self.groups, spill_dir)
            fit(lambda position, block: self._save(plan, position, block))
            missing = [p for p in self.groups if not spill_file(spill_dir, p).is_file()]
            if missing:
                raise RuntimeError(f"the layerwise fit never finished output layer(s) {missing}")
            yield plan
        finally:
            shutil.rmtree(spill_dir, ignore_errors=True)


def run_layerwise_fit(
    source_dir: Path,
    config_dict: dict,
    resolution: Resolution,
    blocks: TokenBlocks,
    dtype: torch.dtype,
    manifest: dict,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> Callable[[BlockDone], None]:
    """The `fit` for `SpilledFit.fitted`: the layerwise data steps on the input checkpoint; their report goes into
    `manifest["calibration"]` (as the in-memory apply records it)."""
    from surgery.reconstruct_layerwise import run_data_steps_layerwise

    def tick(done: int, total: int, _unit: str) -> None:
        if progress:
            progress(f"fitting data steps layer by layer {done}/{total}")

    def fit(on_block) -> None:
        report = run_data_steps_layerwise(source_dir, config_dict, resolution, blocks, dtype=dtype,
                                          on_block=on_block, progress=tick, cancel=cancel)
        manifest["calibration"] = report.describe()

    return fit


__all__ = ["LAYER_BY_LAYER", "SpilledFit", "redirect", "run_layerwise_fit", "spill_bytes", "spill_groups"]
