"""Checkpoints of a running job: tensors in safetensors, everything else in JSON; never a pickle.

One checkpoint is a directory `checkpoints/step-00000050/`:

    model.safetensors       student.<param> and projection.<param> tensors
    optimizer.safetensors   optim.<param index>.<key> tensors (AdamW moments and step counters)
    rng.safetensors         rng.cpu (and rng.cuda) generator states
    state.json              version, step, data position, optimizer hyper-parameters, python RNG state, files

It is written into a hidden temporary sibling, fsynced, and renamed into place, so a checkpoint directory either
exists whole or not at all: a crash or a full disk while checkpointing leaves the previous checkpoint the latest
valid one. Only then are checkpoints beyond `keep` removed (oldest first).

A sharded (FSDP) checkpoint is the same directory written by every rank together (`save_sharded_checkpoint`):

    shards/shard-0000R-model-00001-of-00001.safetensors   each rank's slices (torch.distributed.checkpoint)
    rank-R.safetensors, rank-R.json                       each rank's torch and Python RNG states
    optimizer.json                                        AdamW's hyper-parameters per parameter group
    state.json                                            as above, with "sharded": "fsdp" and the world size

Rank 0 names the temporary directory, every rank writes into it, and rank 0 renames it once all have finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

from surgery.errors import UserError

CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})$")
_GROUPS = (("model", ("student.", "projection.")), ("optimizer", ("optim.",)), ("rng", ("rng.",)))


class CheckpointError(UserError):
    """A checkpoint could not be written or read."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every name its own storage: safetensors refuses tensors that share memory, as tied weights (a
    backbone's embed_tokens / lm_head) do in a state_dict. The second name gets a copy; loading writes both back
    into the one tied parameter."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def save_checkpoint(directory: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                    keep: int = 2) -> Path:
    """Write a checkpoint for `step` atomically and prune old ones; returns its directory.

    Args:
        directory: The job's checkpoints/ directory.
        step: Finished steps (the checkpoint resumes at this step).
        tensors: Names -> tensors; names start with student., projection., optim. or rng.
        meta: JSON-able metadata (stored in state.json).
        keep: Complete checkpoints to keep.

    Raises:
        CheckpointError: Writing failed (disk full, permissions); the previous checkpoints are untouched.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(directory)
    name = checkpoint_name(step)
    final = directory / name
    tmp = directory / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    files = {}
    try:
        tmp.mkdir()
        for group, prefixes in _GROUPS:
            part = _unshared({k: v.detach().cpu().contiguous() for k, v in tensors.items() if k.startswith(prefixes)})
            if part:
                save_file(part, str(tmp / f"{group}.safetensors"), metadata={"format": "pt"})
                files[group] = f"{group}.safetensors"
        unknown = [k for k in tensors if not k.startswith(tuple(p for _, ps in _GROUPS for p in ps))]
        if unknown:
            raise ValueError(f"checkpoint tensor names with no group: {unknown[:3]}")
        state = {"version": CHECKPOINT_VERSION, **meta, "step": step, "files": files}
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _publish(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(name, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(directory, keep)
    return final


def _write_error(name: str, exc: OSError) -> CheckpointError:
    return CheckpointError(f"cannot write checkpoint {name}: {exc.strerror or exc} (the previous checkpoint stays "
                           "valid)")


def _publish(tmp: Path, final: Path) -> None:
    """fsync every file under `tmp`, then rename it to `final` (replacing a checkpoint of the same step)."""
    for f in sorted(tmp.rglob("*")):
        _fsync(f)
    directory = final.parent
    if final.exists():  # the same step written again by a resumed attempt: replace it
        aside = directory / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(directory)


def _prune(directory: Path, keep: int) -> None:
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(directory: Path, step: int, meta: dict, world, write_shards, keep: int = 2) -> Path:
    """Write a sharded checkpoint for `step` atomically with every rank (a collective: all ranks call it).

    Args:
        directory: The job's checkpoints/ directory (the same path on every rank).
        step: Finished steps.
        meta: JSON-able metadata for state.json (rank 0's is used).
        world: The `surgery.distill.world.World` of this run.
        write_shards: Called on every rank with the temporary directory; writes that rank's files.
        keep: Complete checkpoints to keep.

    Raises:
        CheckpointError: Some rank could not write (all ranks raise it; the previous checkpoints are untouched).
    """
    directory = Path(directory)
    name = checkpoint_name(step)
    final = directory / name
    tmp_name = None
    if world.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(directory)
        tmp_name = f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = directory / world.broadcast_text(tmp_name)
    # each failure is agreed on (world.any, a collective) before the next collective, so no rank waits forever
    error: Exception | None = None
    if world.is_main:
        try:
            tmp.mkdir()
        except OSError as exc:
            error = exc
    if not world.any(error is not None):
        try:
            write_shards(tmp)
        except Exception as exc:  # noqa: BLE001 - the other ranks must learn that this one failed
            error = exc
    if not world.any(error is not None) and world.is_main:
        try:
            state = {"version": CHECKPOINT_VERSION, **meta, "step": step, "files": {}}
            (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            _publish(tmp, final)
        except OSError as exc:
            error = exc
    if world.any(error is not None):
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise _write_error(name, error) from None
        lines = str(error).strip().splitlines() if error is not None else []
        raise _write_error(name, OSError(lines[0] if lines else "another rank could not write its part")) from None
    if world.is_main:
        _prune(directory, keep)
    world.barrier()
    return final


def _remove_stale_tmp(directory: Path) -> None:
    """Remove temporary checkpoint directories left by processes that no longer exist."""
    for p in directory.glob(".tmp-step-*"):
        try:
            pid = int(p.name.split("-")[3])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue
    for p in directory.glob(".old-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of one checkpoint directory.

    Raises:
        CheckpointError: Missing or corrupt files, or a checkpoint from a newer workbench.
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} is from a newer workbench (version {state.get('version')})")
    state["path"] = str(path)  # where a sharded checkpoint's shards are read from
    if state.get("sharded"):
        _check_sharded_files(path, state)
    tensors: dict[str, torch.Tensor] = {}
    for file in state.get("files", {}).values():
        try:
            tensors.update(load_file(str(path / file)))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
            raise CheckpointError(f"corrupt checkpoint file {path / file}: {exc}") from None
    return tensors, state


def _check_sharded_files(path: Path, state: dict) -> None:
    """Every rank's files of a sharded checkpoint are there (they are read later, by each rank)."""
    size = state.get("world_size")
    if not isinstance(size, int) or size < 1:
        raise CheckpointError(f"checkpoint {path} has no valid world_size")
    shards = list((path / "shards").glob("shard-*.safetensors")) if (path / "shards").is_dir() else []
    missing = [f"rank-{r}.{ext}" for r in range(size) for ext in ("safetensors", "json")
               if not (path / f"rank-{r}.{ext}").is_file()]
    if not (path / "optimizer.json").is_file():
        missing.append("optimizer.json")
    if not shards or missing:
        raise CheckpointError(f"incomplete sharded checkpoint {path}: missing {missing[0] if missing else 'shards/'}")


def latest_state(directory: Path) -> dict | None:
    """state.json of the newest checkpoint (no tensors read), or None when there is none or it is unreadable."""
    for path in reversed(list_checkpoints(directory)):
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(state, dict):
            return state
    return None


def latest_checkpoint(directory: Path) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint that loads (an unreadable newer one is skipped), or None when there is none."""
    errors = []
    for path in reversed(list_checkpoints(directory)):
        try:
            tensors, state = load_checkpoint(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        return path, tensors, state
    if errors:
        raise CheckpointError(f"no readable checkpoint: {errors[0]}")
    return None
