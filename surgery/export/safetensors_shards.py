"""Safetensors shards written like `save_pretrained` (same split, file names and index), one tensor in memory at a time.

`save_pretrained` needs the whole state dict at once; an exporter that pads or converts tensors would then hold a
second copy of the model. Here the tensors come from a generator, called twice: once for the names, dtypes and
shapes (each tensor dropped as soon as its shape is known), which fixes the split, the headers and every offset;
then again to write each tensor's bytes into its shard. Peak memory beyond the model: the largest single tensor.

Readers: transformers and vLLM take the shard list from `model.safetensors.index.json` (vLLM's
`DefaultModelLoader._prepare_weights` globs `*.safetensors` and keeps only the files the index's `weight_map`
names: `filter_duplicate_safetensors_files` in vllm/model_executor/model_loader/weight_utils.py); mlx-lm loads
every `model*.safetensors` in the directory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.errors import UserError
from surgery.stream.source import TORCH_NAMES

DEFAULT_MAX_SHARD_SIZE = "5GB"  # save_pretrained's default
# the dtypes written here, torch's -> safetensors' names (surgery.stream.source's table, reversed)
_ST_NAMES = {getattr(torch, TORCH_NAMES[st]): st for st in ("F32", "F16", "BF16", "F64")}

TensorSource = Callable[[], Iterator[tuple[str, torch.Tensor]]]


def parse_shard_size(size: str | int) -> int:
    """Bytes of a shard size as save_pretrained takes it ("5GB", "500MB", "64KiB" or an int); UserError otherwise."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        value = size if isinstance(size, int) else parse_size_to_int(str(size).strip())
    except ValueError:
        value = None
    if not isinstance(value, int) or value <= 0:
        raise UserError(f"bad shard size {size!r}: give a positive size such as 5GB, 500MB or 64KB")
    return value


@dataclass(frozen=True)
class _Spec:
    """What `surgery.stream.files.header_bytes` needs of a tensor."""

    name: str
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    nbytes: int


def _spec(name: str, t: torch.Tensor, dtype: torch.dtype) -> _Spec:
    if dtype not in _ST_NAMES:
        raise UserError(f"cannot write {dtype} tensors to safetensors here (float32, float16, bfloat16)")
    return _Spec(name, _ST_NAMES[dtype], tuple(t.shape), t.numel() * dtype.itemsize)


def write_sharded(tensors: TensorSource, directory: Path, dtype: torch.dtype,
                  max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, progress=None) -> int:
    """Write `tensors()` (name, tensor) pairs, converted to `dtype`, as save_pretrained's shards into `directory`.

    One file `model.safetensors` when everything fits in `max_shard_size`, else `model-0000i-of-0000n.safetensors`
    and `model.safetensors.index.json` (metadata.total_size / total_parameters, weight_map), split exactly as
    huggingface_hub splits a state dict for save_pretrained. Returns the number of parameters written.
    """
    from surgery.stream.files import header_bytes, shard_index, split_like_save_pretrained, write_index

    limit = parse_shard_size(max_shard_size)
    specs = {name: _spec(name, t, dtype) for name, t in tensors()}  # pass 1: shapes only, nothing kept
    state = {s.name: (s.dtype, s.shape) for s in specs.values()}
    split = split_like_save_pretrained(state, limit)
    fds: dict[str, int] = {}
    try:
        for filename, names in sorted(split.filename_to_tensors.items()):
            fds[filename] = os.open(directory / filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            _write_all(fds[filename], header_bytes([specs[k] for k in names]))
        if progress:
            progress(f"writing {len(fds)} safetensors file(s)")
        for name, t in tensors():  # pass 2: the same order, so each shard's tensors land at their offsets
            spec = specs.get(name)
            if spec is None or tuple(t.shape) != spec.shape:
                raise RuntimeError(f"tensor source changed between passes at {name}")
            if t.numel():
                data = t.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
                _write_all(fds[split.tensor_to_filename[name]], memoryview(data))
    finally:
        for fd in fds.values():
            os.close(fd)
    params = sum(math.prod(s.shape) for s in specs.values())
    index = shard_index(split, params)
    if index is not None:
        write_index(directory, index)
    return params


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]
