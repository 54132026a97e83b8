"""FSDP2 for distillation jobs: sharding, sharded-gradient clipping, sharded checkpoints, the gathered output.

The student is sharded with `torch.distributed.fsdp.fully_shard`, one FSDP unit per decoder layer and then the
root (embeddings, final norm, lm_head, tied or not): each rank keeps 1/N of every parameter, gradient and AdamW
moment, and all-gathers one layer at a time for its forward and backward. The teacher is sharded the same way
(no optimizer, resharded after each layer's forward): it is the unpruned model, so it is the larger of the two and
cannot be replicated on devices that cannot hold the student.

No rank but rank 0 reads a weight: every rank builds each model as a skeleton (`skeleton`: parameters on the meta
device, buffers such as the rotary frequencies computed as loading computes them), shards it, allocates only its
own shards (`to_empty`), and receives them from the full state dict rank 0 reads, one tensor broadcast at a time
(`torch.distributed.checkpoint.state_dict.set_model_state_dict(..., broadcast_from_rank0=True)`): rank 0 holds one
whole model (the one being filled) and every other rank its shards plus one tensor in flight.

Checkpoint shards are written by `torch.distributed.checkpoint` with its safetensors storage
(`HuggingFaceStorageWriter(save_distributed=True)`: one `shard-0000R-...safetensors` per rank whose header holds
the offsets of each slice; no `.metadata` pickle), from the model and optimizer state dicts of
`torch.distributed.checkpoint.state_dict`. Per-rank RNG states go into `rank-R.safetensors` / `rank-R.json`, the
optimizer's hyper-parameters into `optimizer.json` (surgery.jobs.checkpoint writes state.json and renames the
directory into place).
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from surgery.distill.world import World
from surgery.errors import UserError

SHARDS_DIR = "shards"  # DCP's safetensors shards inside a checkpoint directory
OPTIMIZER_FILE = "optimizer.json"


def rank_files(rank: int) -> tuple[str, str]:
    """(torch RNG safetensors, Python RNG json) file names of one rank in a sharded checkpoint."""
    return f"rank-{rank}.safetensors", f"rank-{rank}.json"


def mixed_precision(world: World, autocast: bool):
    """bf16 compute and all-gathers with float32 gradient reduction on CUDA when autocast is asked; on CPU no
    casting at all (float32 everywhere, as the single-process job on CPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if autocast and world.device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: nn.Module, layers: nn.ModuleList, world: World, policy) -> None:
    """fully_shard each decoder layer, then the root, over all ranks of `world` (parameters move to its device)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def skeleton(path: Path, dtype: str | torch.dtype) -> nn.Module:
    """The model `surgery.loading.load_model(path, dtype=dtype)` builds, with its parameters on the meta device (no
    weight read, no memory) and its buffers real on CPU (computed at construction, as loading computes them)."""
    from surgery.importance.layerwise import skeleton_model
    from surgery.loading import parse_dtype, read_config

    config = read_config(Path(path))
    return skeleton_model(Path(path), config, parse_dtype(dtype, config))


def read_full_state(path: Path, dtype: str | torch.dtype) -> dict[str, torch.Tensor]:
    """The whole state dict of the model in `path` on CPU, read as `load_model` reads it (rank 0 only)."""
    from surgery.loading import load_model

    with torch.random.fork_rng(devices=[]):  # only rank 0 reads: keep its RNG stream where the others' is
        return load_model(str(path), dtype=dtype, device="cpu").model.state_dict()


def rank0_only(world: World, read: Callable):
    """`read()` on rank 0 (None elsewhere); when it fails, every rank raises (the others would otherwise wait in the
    broadcast for ever): rank 0 its own error, the others a UserError (or RuntimeError for a bug) with its text."""
    result, failure = None, None
    if world.is_main:
        try:
            result = read()
        except Exception as exc:  # re-raised below, after the other ranks have been told
            failure = exc
    text = world.broadcast_text(None if failure is None else ("U" if isinstance(failure, UserError) else "B")
                                + str(failure))
    if failure is not None:
        raise failure
    if text:
        raise (UserError if text[0] == "U" else RuntimeError)(text[1:])
    return result


def shard_from_rank0(model: nn.Module, layers: nn.ModuleList, world: World, policy,
                     read_full: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Shard a `skeleton` over the ranks (as `shard`) and fill each rank's shards from the state dict `read_full()`
    returns on rank 0 (called there only); the model ends on `world.device` as if loaded whole and then sharded.

    Raises:
        ValueError: `model` has parameters off the meta device (it is no skeleton: nothing would be saved).
        UserError: rank 0 could not read the weights (raised on every rank).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not all(p.is_meta for p in model.parameters()):
        raise ValueError("shard_from_rank0 takes a skeleton (every parameter on the meta device)")
    shard(model, layers, world, policy)
    # to_empty allocates this rank's shards and every buffer uninitialised: buffers that are not in the state dict
    # (rotary inv_freq) are put back from the skeleton; the state dict's (placeholders) come with the broadcast
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=world.device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    full = rank0_only(world, read_full) or {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    full.clear()  # rank 0: the whole model goes now, not when the caller's frame ends


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `tensors` together (float32, 0-dim): sharded DTensors (each rank holds a slice) and
    ordinary tensors (replicated on every rank, e.g. the projection) mixed; a collective when any is sharded."""
    from torch.distributed.tensor import DTensor

    sharded = [t for t in tensors if isinstance(t, DTensor)]
    plain = [t for t in tensors if not isinstance(t, DTensor)]
    parts = []
    if sharded:
        parts.append(torch.nn.utils.get_total_norm(sharded).full_tensor().float())  # sum of squares over ranks
    if plain:
        parts.append(torch.nn.utils.get_total_norm(plain).float().to(parts[0].device if parts else plain[0].device))
    if not parts:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(parts))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ for sharded gradients: the norm is the global one (every rank's slices), and every rank
    scales its slices by the same coefficient, so the result is the unsharded clip up to float summation order."""
    grads = [p.grad for p in params if p.grad is not None]
    total = global_norm(grads)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).item()  # a float32 value: the same scaling as torch's
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)
    return float(total)


# ---------------------------------------------------------------------------------------------- checkpoints


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _flat(model_sd: dict, optim_sd: dict | None) -> dict[str, torch.Tensor]:
    """One flat name -> tensor map: model tensors under their names (the second name of a tied weight dropped:
    safetensors refuses shared storage, and loading the first fills both), optimizer tensors as
    optim.<param name>.<key>."""
    flat, seen = {}, set()
    for name, t in model_sd.items():
        ptr = _local(t).untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            flat[name] = t
    for name, entry in (optim_sd or {}).get("state", {}).items():
        for key, value in entry.items():
            if not torch.is_tensor(value):
                raise ValueError(f"optimizer state {name}.{key} is not a tensor")
            flat[f"optim.{name}.{key}"] = value
    return flat


def write_shards(tmp: Path, container: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> None:
    """Write this rank's part of a checkpoint into `tmp` (every rank calls it: a collective).

    `container` holds the sharded student (and the replicated projection) under the names the checkpoint uses."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_sd = get_model_state_dict(container)
    # before the first step AdamW has no state; asking for it would run a zero step that sets its counters to 1
    optim_sd = get_optimizer_state_dict(container, optimizer) if optimizer.state else None
    dcp.save(_flat(model_sd, optim_sd), storage_writer=dcp.HuggingFaceStorageWriter(
        str(tmp / SHARDS_DIR), save_distributed=True))
    rng_file, py_file = rank_files(world.rank)
    rng = {"rng.cpu": torch.get_rng_state()}
    if world.device.type == "cuda":
        rng["rng.cuda"] = torch.cuda.get_rng_state(world.device)
    save_file(rng, str(tmp / rng_file), metadata={"format": "pt"})
    version, state, gauss = random.getstate()
    (tmp / py_file).write_text(json.dumps({"python_random": [version, list(state), gauss]}) + "\n")
    if world.is_main:
        groups = None if optim_sd is None else optim_sd["param_groups"]
        (tmp / OPTIMIZER_FILE).write_text(json.dumps({"param_groups": groups}, sort_keys=True) + "\n")


def read_shards(path: Path, container: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> None:
    """Restore what `write_shards` wrote (every rank calls it: a collective) into the sharded modules in place."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    groups = json.loads((path / OPTIMIZER_FILE).read_text())["param_groups"]
    model_sd = get_model_state_dict(container)
    optim_sd = get_optimizer_state_dict(container, optimizer) if groups is not None else None
    dcp.load(_flat(model_sd, optim_sd), storage_reader=dcp.HuggingFaceStorageReader(str(path / SHARDS_DIR)))
    set_model_state_dict(container, model_sd)
    if optim_sd is not None:
        optim_sd["param_groups"] = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]
        set_optimizer_state_dict(container, optimizer, optim_sd)
    rng_file, py_file = rank_files(world.rank)
    rng = load_file(str(path / rng_file))
    torch.set_rng_state(rng["rng.cpu"])
    if "rng.cuda" in rng and world.device.type == "cuda":
        torch.cuda.set_rng_state(rng["rng.cuda"], world.device)
    version, state, gauss = json.loads((path / py_file).read_text())["python_random"]
    random.setstate((version, tuple(state), gauss))


# ---------------------------------------------------------------------------------------------- the output


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole unsharded state dict on CPU on rank 0 ({} on the other ranks); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if full:
        # gathering copies a tied weight once per name: give the names one tensor again, so save_pretrained
        # writes the tie as the unsharded model does (lm_head.weight left out when tied to the embeddings)
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first and name in full:
                full[name] = full[first[id(p)]]
            first.setdefault(id(p), name)
    return full


@contextlib.contextmanager
def unsharded_class(model: nn.Module, cls: type):
    """Show `model` as its class from before fully_shard (which subclasses it as FSDP<cls>) while it is saved:
    save_pretrained writes the class name into config.json's architectures."""
    sharded_cls = type(model)
    model.__class__ = cls
    try:
        yield model
    finally:
        model.__class__ = sharded_cls
