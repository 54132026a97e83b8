"""Content fingerprints: which exact weights (and token streams) a plan, score or benchmark was made for.

`weights_fingerprint` hashes every weight byte, which takes seconds for a big model, so results are cached in
`<cache>/fingerprints.json` keyed by (absolute path, size, mtime_ns) of each hashed file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from surgery.cache import atomic_write_text, cache_root
from surgery.errors import SourceError
from surgery.shards import index_shards

# 1 MB reads stay in the core's L2 cache until sha256 reads them: measured here, 0.82 s of CPU per GB against
# 1.00 s with 8 MB reads (benchmarks/stream_apply.py's `plan validate` is this, on 13.5 GB)
_CHUNK = 1024 * 1024
_CACHE_FILE = "fingerprints.json"
_MAX_ENTRIES = 500
# A file modified this recently may still change within the same mtime tick ("racy git"): never cache it.
_RACY_NS = 2_000_000_000
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def weight_files(directory: Path) -> list[Path]:
    """The files whose bytes define a HF directory's weights, in fingerprint order (sorted by name).

    Safetensors files when there are any, else pickled checkpoints: pytorch_model*.bin when present (so that
    training_args.bin and friends are left out), else every *.bin, *.pt and *.pth.
    """
    files = sorted(p for p in directory.iterdir() if p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    # Every shard the index names is covered too, wherever inside the directory it lies and whatever its type:
    # those are the bytes the loader reads.
    shards = [directory / os.path.normpath(s) for s in index_shards(directory) or []]
    if shards:
        return sorted(set(safetensors) | set(shards), key=lambda p: p.relative_to(directory).as_posix())
    if safetensors:
        return safetensors
    pickles = [p for p in files if p.suffix in _PICKLE_SUFFIXES]
    return [p for p in pickles if p.name.startswith("pytorch_model")] or pickles


def _hash_file(h: hashlib._Hash, path: Path) -> None:
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])


def _stat_key(files: list[Path]) -> list[list]:
    return [[p.name, st.st_size, st.st_mtime_ns] for p in files for st in [p.stat()]]


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a missing or damaged cache is only a cache miss


def weights_fingerprint(path: Path) -> str:
    """Fingerprint the weights of a HF directory or a .gguf file.

    For a directory: sha256 over each weight file in sorted name order, its name (UTF-8) then its full bytes. For a
    .gguf file: sha256 of its bytes.

    Args:
        path: A HF model directory or a .gguf file.

    Returns:
        "sha256:<hex>".

    Raises:
        SourceError: The path does not exist or holds no weights.
    """
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        files = weight_files(path)
        if not files:
            raise SourceError(f"no weight files (*.safetensors) in {path}")
        named = True
    elif path.is_file() and path.suffix.lower() == ".gguf":
        files, named = [path], False
    elif path.exists():
        raise SourceError(f"cannot fingerprint {path}: expected a model directory or a .gguf file")
    else:
        raise SourceError(f"no such file or directory: {path}")

    key = str(path)
    stat = _stat_key(files)
    cache_file = cache_root() / _CACHE_FILE
    entry = _load_cache(cache_file).get(key)
    if isinstance(entry, dict) and entry.get("stat") == stat and isinstance(entry.get("digest"), str):
        return entry["digest"]

    started_ns = time.time_ns()
    h = hashlib.sha256()
    for f in files:
        if named:
            h.update(f.relative_to(path).as_posix().encode("utf-8"))
        _hash_file(h, f)
    digest = "sha256:" + h.hexdigest()

    # Cache only if nothing changed while hashing and no file is young enough to change unnoticed.
    if _stat_key(files) == stat and all(started_ns - s[2] > _RACY_NS for s in stat):
        cache = _load_cache(cache_file)  # re-read: another process may have added entries meanwhile
        cache.pop(key, None)
        cache[key] = {"stat": stat, "digest": digest}
        while len(cache) > _MAX_ENTRIES:
            cache.pop(next(iter(cache)))
        atomic_write_text(cache_file, json.dumps(cache, indent=1))
    return digest


def tokens_fingerprint(ids: Iterable[int] | np.ndarray | object) -> str:
    """Fingerprint a token-id sequence: sha256 of the ids as int64 little-endian bytes (flattened, C order).

    Args:
        ids: A list of ints, a numpy array or a torch tensor.

    Returns:
        "sha256:<hex>".
    """
    if hasattr(ids, "detach"):  # a torch tensor; avoid importing torch for this check
        ids = ids.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(ids, dtype="<i8").reshape(-1))
    return "sha256:" + hashlib.sha256(arr.tobytes()).hexdigest()
