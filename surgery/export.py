"""Write a pruned model as an HF-format directory (atomically), and load checkpoints plain transformers cannot.

Output layout: config.json, model*.safetensors (sharded past 5 GB), tokenizer files, generation_config.json and
`surgery.json` (the manifest: resolved plan, input/output fingerprints, versions). The directory appears only
when complete: everything is written into a hidden temporary sibling that is renamed at the end, so Ctrl-C,
kill -9 or a full disk leave no half-written output and never damage an existing one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery import ops
from surgery.errors import SourceError, UserError
from surgery.plan import write_text_atomic
from surgery.shapes import SURGERY_LAYERS_KEY, shape_from_config

MANIFEST = "surgery.json"
MANIFEST_VERSION = 1


def loadable_with(config_dict: dict) -> str:
    """"transformers" when plain `AutoModelForCausalLM.from_pretrained` loads it, else "surgery"."""
    return "surgery" if config_dict.get(SURGERY_LAYERS_KEY) else "transformers"


def check_output_dir(out: Path, overwrite: bool = False) -> None:
    """Fail early (before any heavy work) when `out` cannot be written or would clobber something."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output path exists and is not a directory: {out}")
        if any(out.iterdir()) and not overwrite:
            raise UserError(f"output directory exists and is not empty: {out} (pass --overwrite to replace it)")
    parent = out.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create {out}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent}: permission denied")


def _tmp_sibling(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_stale_tmp(out: Path) -> None:
    """Remove temp siblings left by a killed earlier run (their pid is gone)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def save_model_dir(
    model: nn.Module,
    out: str | Path,
    *,
    tokenizer: Any = None,
    manifest: dict | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> Path:
    """Save `model` (+ tokenizer, + manifest) to `out` atomically; returns `out`.

    The manifest dict gets `output.fingerprint` (sha256 of the written safetensors) and `output.loadable_with`
    filled in, in place.
    """
    from surgery.fingerprint import weights_fingerprint
    from surgery.sources import quiet_progress_bars

    with atomic_dir(out, overwrite) as tmp:
        with quiet_progress_bars():
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # fsync (disk-bound) runs beside the output fingerprint (CPU-bound, reads the page cache): same safety,
        # about half the wall time of doing them one after the other
        with ThreadPoolExecutor(max_workers=1) as pool:
            synced = pool.submit(_fsync_dir, tmp)
            if manifest is not None:
                cfg = json.loads((tmp / "config.json").read_text())
                # filled in place so the caller's dict describes what was written
                manifest.setdefault("output", {}).update(
                    fingerprint=weights_fingerprint(tmp), loadable_with=loadable_with(cfg)
                )
                write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            synced.result()
    return Path(out)


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden sibling of `out` to fill; on success it replaces `out` (an old `out` is moved aside
    and deleted only after the swap), on any error it is removed and `out` is untouched.

    Raises:
        UserError: `out` is a file, or a non-empty directory without `overwrite`.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tmp = _tmp_sibling(out)
    try:
        tmp.mkdir()
        yield tmp
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    """fsync every finished file of `path` (hidden temp files being written beside it are skipped)."""
    for f in path.iterdir():
        if f.name.startswith("."):
            continue
        try:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        except (FileNotFoundError, IsADirectoryError):
            continue


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and deleted only after the swap."""
    if out.exists():
        aside = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, aside)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(aside, out)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, out)


def restructure_to_config(model: nn.Module, config_dict: dict) -> None:
    """Reshape a freshly built (base-size) model to the per-layer shapes listed in `surgery_layers`.

    Which rows are kept does not matter (the checkpoint's tensors overwrite them); only the shapes and the module
    types do, so the same ops that pruned the model rebuild it.
    """
    shape = shape_from_config(config_dict)
    spec = shape.spec
    layers = ops.get_module(model, spec.layers)
    group = shape.base_heads // shape.base_kv_heads
    for idx, (layer, s) in enumerate(zip(layers, shape.layers)):
        if not s.has_attention:
            ops.drop_attention(layer, spec, idx, s.head_dim)
        elif (s.heads, s.kv_heads) != (shape.base_heads, shape.base_kv_heads):
            per_group = s.heads // s.kv_heads
            keep_q = [g * group + j for g in range(s.kv_heads) for j in range(per_group)]
            attn = ops.get_module(layer, spec.attn)
            ops.prune_attention_heads(
                attn, spec, keep_q, list(range(s.kv_heads)), shape.base_heads, shape.base_kv_heads, s.head_dim
            )
        if not s.has_mlp:
            ops.drop_mlp(layer, spec)
        elif s.mlp != shape.base_mlp:
            ops.prune_mlp_neurons(ops.get_module(layer, spec.mlp), spec, range(s.mlp), shape.base_mlp)
        for rel, rank in sorted(s.low_rank.items()):
            ops.empty_low_rank(layer, rel, rank, spec.conv1d)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
    files = [path / f for f in files] or sorted(path.glob("*.safetensors"))
    if not files:
        raise SourceError(f"no safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
            raise SourceError(f"corrupt or truncated safetensors file: {f} ({exc})") from None
    return state


def load_surgery_checkpoint(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str = "cpu"):
    """Load a checkpoint with per-layer shapes (`surgery_layers` in config.json): one line for the user.

    Builds the model class from the config without initialising weights, reshapes each layer, then assigns the
    checkpoint tensors (strict: every tensor must find its place).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    config_dict = json.loads((path / "config.json").read_text())
    config = AutoConfig.from_pretrained(path)
    from surgery.concurrency import MODEL_BUILD_LOCK

    with MODEL_BUILD_LOCK, no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    restructure_to_config(model, config_dict)
    state = _read_safetensors(path)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise SourceError(
            f"checkpoint does not match its surgery_layers: missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    if tied:
        model.tie_weights()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()
