"""Cached teacher logits: the teacher's top-k log-probabilities at every position of the training blocks, computed
once and read by later jobs, on a machine that may not have the teacher at all (DistillKit's offline logits).

A cache is a directory:

    cache.json          version, key (teacher weights fingerprint, training-data token fingerprint, k), the
                        teacher's config.json and vocabulary hash (so a job can be checked without the teacher),
                        shapes, bytes per token
    topk.safetensors    values (N, S, k) float32 log-probabilities at T = 1, indices (N, S, k) int32 token ids

Log-probabilities at T = 1 are enough for any temperature: over the kept tokens, softmax(z / T) is
softmax(log p / T) (log p = z - logsumexp z differs from z by a constant per position), so a job trains from the
cache exactly as with a live teacher truncated to its top k (`top_k`), up to float rounding.

The directory is written atomically (`surgery.export.atomic_dir`): a job killed while building leaves no cache and
its resume builds it again. A cache whose key differs from the job's (another teacher, other data, another k) is
refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.errors import UserError

CACHE_VERSION = 1
MANIFEST = "cache.json"
TENSORS = "topk.safetensors"
BUILD_BATCH = 4  # blocks per teacher forward while building


def vocab_hash(vocab: dict | None) -> str | None:
    """A stable hash of a tokenizer vocabulary (token -> id), None without one."""
    if vocab is None:
        return None
    return "sha256:" + hashlib.sha256(json.dumps(vocab, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_manifest(directory: str | Path) -> dict | None:
    """The cache.json of a complete cache, None when `directory` holds no cache yet.

    Raises:
        UserError: `directory` is a file, a non-empty directory that is not a cache, or an unreadable or newer cache.
    """
    directory = Path(directory).expanduser()
    if not directory.exists():
        return None
    if not directory.is_dir():
        raise UserError(f"--teacher-cache {directory} is a file, not a cache directory")
    manifest = directory / MANIFEST
    if not manifest.is_file():
        if any(p for p in directory.iterdir() if not p.name.startswith(".")):
            raise UserError(f"--teacher-cache {directory} is a non-empty directory without {MANIFEST}: not a "
                            "teacher cache (choose an empty or new directory)")
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"unreadable teacher cache {manifest}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("version"), int) or data["version"] > CACHE_VERSION:
        raise UserError(f"teacher cache {directory} is from a newer workbench (version {data.get('version')})")
    return data


def check_key(manifest: dict, directory: Path, *, teacher_fingerprint: str | None, data_fingerprint: str,
              k: int) -> None:
    """Refuse a cache made for another teacher, other training tokens or another k (one line, exit 2).

    `teacher_fingerprint` None means the teacher is not on this machine: the cache's own record is trusted.
    """
    key = manifest.get("key", {})
    where = f"teacher cache {directory}"
    if key.get("k") != k:
        raise UserError(f"{where} holds the top {key.get('k')} log-probabilities, the job asks for --top-k {k}: "
                        "use another --teacher-cache directory")
    if key.get("data_fingerprint") != data_fingerprint:
        raise UserError(f"{where} was made for other training tokens ({str(key.get('data_fingerprint'))[:19]}..., "
                        f"this job has {data_fingerprint[:19]}...): same data, seq_len and max_tokens, or another "
                        "directory")
    if teacher_fingerprint is not None and key.get("teacher_fingerprint") != teacher_fingerprint:
        raise UserError(f"{where} was made for another teacher (weights "
                        f"{str(key.get('teacher_fingerprint'))[:19]}..., this teacher has "
                        f"{teacher_fingerprint[:19]}...): use another --teacher-cache directory")


@dataclass
class TeacherCache:
    """A complete cache opened for reading.

    Attributes:
        values: (N, S, k) float32 log-probabilities.
        indices: (N, S, k) int64 token ids.
        vocab: the teacher's vocabulary size (width of the dense logits rebuilt from the cache).
        manifest: cache.json.
    """

    values: torch.Tensor
    indices: torch.Tensor
    vocab: int
    manifest: dict

    def teacher_logits(self, blocks: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Dense (B, S, V) stand-in teacher logits for training blocks `blocks` (B,) int64: the cached
        log-probabilities at the top k, -inf elsewhere (what `losses.truncate_top_k` makes of live logits)."""
        values = self.values[blocks].to(device)  # (B, S, k)
        index = self.indices[blocks].to(device)  # (B, S, k)
        dense = torch.full((*values.shape[:2], self.vocab), float("-inf"), device=device)
        return dense.scatter_(-1, index, values)  # (B, S, V)


def open_cache(directory: str | Path) -> TeacherCache:
    """Read a complete cache (its key already checked with `check_key`)."""
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    if manifest is None:
        raise UserError(f"no teacher cache in {directory}")
    try:
        tensors = load_file(str(directory / TENSORS))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise UserError(f"corrupt teacher cache file {directory / TENSORS}: {exc}") from None
    return TeacherCache(tensors["values"], tensors["indices"].long(), int(manifest["teacher"]["vocab"]), manifest)


@torch.inference_mode()
def _top_k_log_probs(teacher, blocks: torch.Tensor, k: int, device: torch.device,
                     progress: Callable[[str], None]):
    values, indices = [], []
    for start in range(0, blocks.shape[0], BUILD_BATCH):
        ids = blocks[start : start + BUILD_BATCH].to(device)  # (b, S)
        log_p = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), dim=-1)  # (b, S, V)
        top = log_p.topk(k, dim=-1)  # sorted: equal inputs give equal files
        values.append(top.values.cpu())
        indices.append(top.indices.to(torch.int32).cpu())
        progress(f"teacher cache: {min(start + BUILD_BATCH, blocks.shape[0])}/{blocks.shape[0]} blocks")
    return torch.cat(values), torch.cat(indices)


def build_cache(directory: str | Path, teacher, *, teacher_source: str, teacher_fingerprint: str,
                teacher_config: dict, teacher_vocab_hash: str | None, blocks, k: int, device: torch.device,
                progress: Callable[[str], None] | None = None) -> dict:
    """Run the teacher over every training block and write the cache atomically; returns its manifest.

    Args:
        directory: The cache directory (absent or empty).
        teacher: The teacher model (eval mode).
        blocks: `surgery.data.TokenBlocks` of the job's training data.
        k: Log-probabilities kept per position.
        progress: Called with one line per batch.
    """
    from safetensors.torch import save_file

    from surgery.export import atomic_dir
    from surgery.plan import write_text_atomic
    from surgery.shapes import shape_from_config

    vocab = shape_from_config(teacher_config).vocab
    if not 1 <= k <= vocab:
        raise UserError(f"--top-k {k} must be between 1 and the teacher's vocabulary size {vocab}")
    values, indices = _top_k_log_probs(teacher, blocks.ids, k, device, progress or (lambda _m: None))
    bytes_per_token = k * (values.element_size() + indices.element_size())
    manifest = {
        "version": CACHE_VERSION,
        "key": {"teacher_fingerprint": teacher_fingerprint, "data_fingerprint": blocks.fingerprint, "k": k},
        "teacher": {"source": teacher_source, "vocab": vocab, "config": teacher_config,
                    "tokenizer_vocab": teacher_vocab_hash},
        "data": blocks.describe(),
        "values": "float32 log-probabilities at T = 1, (blocks, seq_len, k), sorted decreasing",
        "indices": "int32 token ids, (blocks, seq_len, k)",
        "bytes_per_token": bytes_per_token,
        "bytes": bytes_per_token * blocks.num_tokens,
    }
    with atomic_dir(directory, overwrite=True) as tmp:
        save_file({"values": values.contiguous(), "indices": indices.contiguous()}, str(tmp / TENSORS),
                  metadata={"format": "pt"})
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
