"""Checkpoints of a running job: tensors in safetensors, everything else in JSON; never a pickle.

One checkpoint is a directory `checkpoints/step-00000050/`:

    model.safetensors       student.<param> and projection.<param> tensors
    optimizer.safetensors   optim.<param index>.<key> tensors (AdamW moments and step counters)
    rng.safetensors         rng.cpu (and rng.cuda) generator states
    state.json              version, step, data position, optimizer hyper-parameters, python RNG state, files

It is written into a hidden temporary sibling, fsynced, and renamed into place, so a checkpoint directory either
exists whole or not at all: a crash or a full disk while checkpointing leaves the previous checkpoint the latest
valid one. Only then are checkpoints beyond `keep` removed (oldest first).
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
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # the same step written again by a resumed attempt: replace it
            aside = directory / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {name}: {exc.strerror or exc} (the previous checkpoint "
                              "stays valid)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
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
    tensors: dict[str, torch.Tensor] = {}
    for file in state.get("files", {}).values():
        try:
            tensors.update(load_file(str(path / file)))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
            raise CheckpointError(f"corrupt checkpoint file {path / file}: {exc}") from None
    return tensors, state


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
