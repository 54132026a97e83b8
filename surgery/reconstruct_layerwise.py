"""The data-driven plan steps (reconstruct, whitened / asvd low rank) from a safetensors checkpoint, holding one
original block and its cut copy at a time, instead of two whole models (`surgery.reconstruct.apply_calibrated`).

Per decoder layer i, in order: block i is read from the shards (`surgery.importance.layerwise.Skeleton`), a copy
of it is cut with the plan's cuts for that layer (`surgery.apply.apply_layer_cut`, what `apply_resolution` runs on
each layer), and `surgery.reconstruct.fit_layer` runs on the pair exactly as the in-memory path runs it. Between
layers only the hidden states of all calibration tokens are kept: the original model's (the refit targets' inputs,
and the fit inputs for `inputs: original`) and, for `inputs: pruned`, the cut prefix's. Each layer receives the
arguments the original model's own forward passes it (masks, rotary tensors), caught once per batch; the cut
model's forward computes the same values for the same layer (they depend on positions and the layer's attention
type, never on widths), so the fit sees bit for bit the inputs of the in-memory path.

Why the result equals the in-memory one bit for bit (tests/test_reconstruct_layerwise.py checks torch.equal): every
tensor goes through the same operations in the same order: the same cut ops on the same stored values, the same
layer forwards per batch, the same float64 Gram sums batch after batch, the same Cholesky solves. The only
difference is which other layers are in memory meanwhile, which no computation reads.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from surgery.data import TokenBlocks
from surgery.heap import HeapTrimmer
from surgery.metrics.common import check_cancel
from surgery.reconstruct import DataReport, Progress, _whitened, check_enough_tokens, fit_layer
from surgery.resolve import Resolution

BlockDone = Callable[[int, nn.Module], None]


@torch.no_grad()
def run_data_steps_layerwise(
    source_dir: Path | str,
    config_dict: dict,
    resolution: Resolution,
    blocks: TokenBlocks,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    on_block: BlockDone | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> DataReport:
    """Run the resolution's data-driven steps layer by layer on the checkpoint in `source_dir`.

    Args:
        source_dir: the safetensors checkpoint the resolution was made against (its config is `config_dict`).
        resolution: a resolution with data-driven steps (reconstruct and/or whitened / asvd low_rank).
        blocks: its calibration tokens (`surgery.reconstruct.load_calibration`).
        dtype, device: the weights' dtype (stored tensors are cast as loading the model casts them) and where the
            two blocks and the hidden states live.
        on_block: on_block(position, block) once per kept layer up to the last one with a data step, when it is
            final (cut and fitted; `position` is its index in the cut model): the caller writes its tensors out
            (`block.state_dict()`, names relative to the layer). The block is freed afterwards.
        progress: progress(layers done, layers, "layers"); cancel: checked between layers.

    Returns:
        What the steps did, as `run_data_steps` reports it.

    Raises:
        UserError: the calibration text is too short for full-rank Gram matrices. (prune_hidden with data steps is
            refused by the resolver, so the cut model's embeddings are always the original's.)
    """
    from surgery.apply import apply_layer_cut
    from surgery.importance.layerwise import call_layer, capture_layer_calls, open_skeleton

    check_enough_tokens(resolution, blocks)
    spec, step = resolution.shape.spec, resolution.reconstruct
    carry = step is None or step.inputs == "pruned"
    batch_size = resolution.calibration.batch_size if resolution.calibration else 8
    work = [c for c in resolution.layers if not c.dropped and (c.refit or _whitened(c))]
    report = DataReport(tokens=blocks.num_tokens)
    if not work:
        return report
    last = work[-1].index
    skeleton = open_skeleton(Path(source_dir), config_dict, dtype, device)
    batches = [b.to(skeleton.device) for b in blocks.batches(batch_size)]
    x_o, calls = capture_layer_calls(skeleton.model, spec.layers, batches)
    x_p = list(x_o)  # the cut model's embeddings are the original's (no prune_hidden here)
    position = {cut.index: j for j, cut in enumerate(resolution.kept_layers)}
    trim_heap = HeapTrimmer()
    for cut in resolution.layers[: last + 1]:
        check_cancel(cancel)
        i = cut.index
        original = skeleton.load_block(i)
        layer = None
        if not cut.dropped:
            layer = copy.deepcopy(original)
            if cut.changed:
                apply_layer_cut(layer, cut, spec, i)
            for module in layer.modules():  # as apply_resolution renumbers the survivors (the KV cache index)
                if hasattr(module, "layer_idx"):
                    module.layer_idx = position[i]
        x_o_next = fit_layer(cut, spec, step, original, layer, x_o, x_p if carry else x_o, calls[i], calls[i],
                             report)
        if layer is not None:
            if carry and i < last:
                x_p = [call_layer(layer, x, calls[i][b]) for b, x in enumerate(x_p)]
            if on_block is not None:
                on_block(position[i], layer)
        original.to("meta")
        del layer
        x_o = x_o_next
        trim_heap()  # else the resident size grows by the freed blocks' holes each layer (surgery.heap)
        if progress:
            progress(i + 1, last + 1, "layers")
    return report


__all__ = ["BlockDone", "run_data_steps_layerwise"]
