"""The shard index of a sharded checkpoint (`model.safetensors.index.json`), read once and checked.

The index is data from the model's author: a hostile one could point at `../../other/model.safetensors` (weights
from outside the directory, which the directory's fingerprint would not cover) or at a pickled `.bin`. Every
reader of the index (source checks, fingerprint, headers, the surgery loader) goes through `index_shards`.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.errors import SourceError

INDEX_NAME = "model.safetensors.index.json"


def read_index(directory: Path) -> dict[str, str] | None:
    """The index's weight map {tensor name: shard file} of `directory`, or None when it has no index.

    Raises:
        SourceError: The index is unreadable or corrupt, or names a shard outside `directory`.
    """
    directory = Path(directory)
    index = directory / INDEX_NAME
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
            raise ValueError("weight_map must map tensor names to shard file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"corrupt safetensors index: {index} ({type(e).__name__}: {e})") from None
    root = directory.resolve()
    for shard in sorted(set(weight_map.values())):
        target = (directory / shard).resolve()
        if Path(shard).is_absolute() or not target.is_relative_to(root) or target == root:
            raise SourceError(f"safetensors index {index} names a shard outside the model directory: {shard}")
    return weight_map


def index_shards(directory: Path) -> list[str] | None:
    """The shard file names the index of `directory` names (sorted, unique), or None when it has no index.

    Raises:
        SourceError: As `read_index`.
    """
    weight_map = read_index(directory)
    return None if weight_map is None else sorted(set(weight_map.values()))
