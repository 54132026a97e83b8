"""The teacher's rankings for DLLM2Rec, computed once per (teacher, data, K) and cached in safetensors.

For every training prefix (user u, position t of `RecData.train_examples()`, i.e. the items inputs[u, :t + 1])
the teacher scores every item once; the cache keeps

    candidates  (U, L, K) int64    the teacher's top-K items, best first, the prefix's own items excluded
                                   (they are never recommended or evaluated: a user rates a movie once); 0 where
                                   position t has no target
    distances   (U, L, K) float32  d_sk = ||h^T_s - e^T_k||: the teacher's output state for the prefix (its
                                   "generated" item-space vector, `RecModel.hidden`) to candidate k's item embedding
    items       (N + 1, d_T)       the teacher's item representation: `item_embeddings()`, i.e. LLMRec's
                                   `items.weight` (the table its scores are dot products with)

Rows cover every user (so runs with different --max-users share one file). The file's metadata holds the key:
teacher fingerprint (sha256 of every *.safetensors in the teacher directory: backbone and rec.safetensors), data
fingerprint, K and the candidate rule. The default file lives under `<workbench cache>/rec-teacher/<key hash>`;
a file given explicitly that holds another key is refused, a default file that does not match is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery.errors import UserError

CACHE_VERSION = 1
CANDIDATES = "top-k of all items, the prefix's own items excluded"


@dataclass
class TeacherRankings:
    """What `load_or_build` returns (tensors on CPU)."""

    candidates: torch.Tensor  # (U, L, K) int64
    distances: torch.Tensor  # (U, L, K) float32
    items: torch.Tensor  # (N + 1, d_T) float32
    key: dict = field(default_factory=dict)
    path: Path | None = None
    hit: bool = False  # read from the cache (True) or computed now


def cache_key(teacher_fingerprint: str, data_fingerprint: str, top_k: int) -> dict:
    """The fields that decide whether a cached file can be reused."""
    return {"kind": "dllm2rec-teacher", "version": CACHE_VERSION, "teacher": teacher_fingerprint,
            "data": data_fingerprint, "top_k": top_k, "candidates": CANDIDATES}


def default_cache_path(key: dict) -> Path:
    """<workbench cache>/rec-teacher/<sha256 of the key>.safetensors."""
    from surgery.cache import cache_root

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "rec-teacher" / f"{digest}.safetensors"


class RankingsCancelled(Exception):
    """The user cancelled while the teacher's rankings were being computed (nothing was cached)."""


def teacher_top_k(teacher, inputs: torch.Tensor, targets: torch.Tensor, k: int, *, batch_size: int = 32,
                  device: str = "cpu", progress: Callable[[str], None] | None = None,
                  cancel: threading.Event | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k unseen items and their distances at every prefix with a target.

    Args:
        teacher: A RecModel (eval mode) with `hidden` and `item_embeddings`.
        inputs, targets: (U, L) from `RecData.train_examples`.
        k: Candidates per prefix.

    Returns:
        candidates (U, L, k) int64 and distances (U, L, k) float32 (zeros where targets == 0).
    """
    from surgery.rec.dllm2rec import prefix_seen, top_unseen

    cands = torch.zeros(*inputs.shape, k, dtype=torch.long)
    dists = torch.zeros(*inputs.shape, k)
    with torch.no_grad():
        items = teacher.item_embeddings().float()  # (N + 1, d_T)
        for start in range(0, inputs.shape[0], batch_size):
            if cancel is not None and cancel.is_set():
                raise RankingsCancelled("teacher rankings cancelled")
            sl = slice(start, start + batch_size)
            x = inputs[sl].to(device)
            h = teacher.hidden(x).float()  # (B, L, d_T)
            top = top_unseen(h @ items.t(), prefix_seen(x, items.shape[0] - 1), k)  # (B, L, K)
            dist = (h.unsqueeze(2) - items[top]).norm(dim=-1)  # (B, L, K)
            keep = (targets[sl] > 0).unsqueeze(-1).to(top.device)  # (B, L, 1)
            cands[sl] = (top * keep).cpu()
            dists[sl] = (dist * keep).cpu()
            if progress is not None:
                progress(f"teacher rankings: {min(start + batch_size, inputs.shape[0])}/{inputs.shape[0]} users")
    return cands, dists


def check_top_k(top_k: int, data) -> None:
    """Refuse a K that some prefix cannot fill with unseen items.

    Raises:
        UserError: K < 1 or K > items - history cap.
    """
    if not 1 <= top_k <= data.num_items - data.max_len:
        raise UserError(f"--top-k must be between 1 and {data.num_items - data.max_len} (items minus the history "
                        f"cap, so every prefix has K unseen items); got {top_k}")


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(key, tensors) of a cache file, or None when it is unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            key = json.loads((f.metadata() or {}).get("key", "null"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, ValueError, RuntimeError):
        return None
    return (key, tensors) if isinstance(key, dict) else None


def load_or_build(teacher_dir: str | Path, data, top_k: int, *, path: str | Path | None = None,
                  device: str = "cpu", dtype: str = "float32", progress: Callable[[str], None] | None = None,
                  cancel: threading.Event | None = None) -> TeacherRankings:
    """The teacher's rankings for `data`: read from the cache, or computed (the teacher is loaded only then).

    Args:
        teacher_dir: A rec model directory (any kind; DLLM2Rec means an LLM recommender).
        data: The `RecData` the student trains on (the teacher must have been trained on it too).
        top_k: K.
        path: Cache file (default: `default_cache_path`).

    Raises:
        UserError: A K the catalogue cannot fill, a teacher trained on other data, or an explicit cache file that
            holds another teacher / data / K.
    """
    from safetensors.torch import save_file

    from surgery.cache import file_lock
    from surgery.fingerprint import weights_fingerprint
    from surgery.rec.store import check_same_data, load_rec_model, read_rec_json

    say = progress or (lambda _m: None)
    check_top_k(top_k, data)
    teacher_dir = Path(teacher_dir).expanduser()
    check_same_data(read_rec_json(teacher_dir), data, f"the teacher {teacher_dir}", "this data")
    say("fingerprinting the teacher")
    key = cache_key(weights_fingerprint(teacher_dir), data.fingerprint, top_k)
    explicit = path is not None
    path = Path(path).expanduser() if explicit else default_cache_path(key)
    shape = (data.num_users, data.max_len, top_k)
    with file_lock("rec-teacher-" + path.name.split(".")[0]):
        found = _read(path) if path.is_file() else None
        if found is not None and found[0] == key and tuple(found[1]["candidates"].shape) == shape:
            t = found[1]
            return TeacherRankings(t["candidates"], t["distances"], t["items"], key, path, hit=True)
        if explicit and path.exists():
            theirs = found[0] if found else {}
            raise UserError(f"{path} holds teacher rankings for another teacher, data or K (teacher "
                            f"{str(theirs.get('teacher', '?'))[:19]}..., K {theirs.get('top_k', '?')}): delete it or "
                            "pass another --teacher-cache")
        say(f"loading the teacher {teacher_dir}")
        teacher, _, _ = load_rec_model(teacher_dir, device=device, dtype=dtype)
        inputs, targets = data.train_examples()
        cands, dists = teacher_top_k(teacher, inputs, targets, top_k, device=device, progress=say, cancel=cancel)
        items = teacher.item_embeddings().detach().float().cpu().contiguous()
        del teacher
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file({"candidates": cands, "distances": dists, "items": items}, str(tmp),
                      metadata={"format": "pt", "key": json.dumps(key, sort_keys=True)})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return TeacherRankings(cands, dists, items, key, path, hit=False)
