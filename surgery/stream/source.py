"""Where every tensor of a safetensors checkpoint lies on disk: file, absolute byte offset, dtype, shape.

`surgery.inspect.read_safetensors_header` checks a header and gives sizes; streaming also needs the offsets, so
this reads the same header once more (a few KB per file) and keeps them.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SourceError
from surgery.inspect import read_safetensors_header
from surgery.shards import index_shards

# dtypes are safetensors' names ("BF16") everywhere in surgery.stream, so planning needs no torch; the bytes per
# element of each format a transformers checkpoint holds (surgery.stream.writer maps them to torch dtypes)
ST_ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
ST_FLOATS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# the same formats by torch's names (which safetensors' serializer also takes)
TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


@dataclass(frozen=True)
class SourceTensor:
    """One stored tensor: its bytes are file[start : start + nbytes], C order."""

    file: Path
    start: int
    dtype: str  # safetensors name, "BF16"
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return ST_ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along dim 0 (one element for a 1-D tensor)."""
        return math.prod(self.shape[1:]) * self.itemsize


def weight_shards(directory: Path) -> list[Path]:
    """The safetensors files holding a HF directory's weights (the index's shards, or model.safetensors)."""
    names = index_shards(directory)
    if names is not None:
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise SourceError(f"no model.safetensors or model.safetensors.index.json in {directory}")


def file_tensors(path: Path) -> dict[str, SourceTensor]:
    """Every tensor of one safetensors file, from its header alone.

    Raises:
        SourceError: The header is corrupt, or holds a dtype streaming cannot read.
    """
    read_safetensors_header(path)  # the checks: sizes, offsets inside the file
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    found: dict[str, SourceTensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry["dtype"]
        if dtype not in ST_ITEMSIZE:
            raise SourceError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which streaming cannot read")
        found[name] = SourceTensor(path, 8 + n + entry["data_offsets"][0], dtype, tuple(entry["shape"]))
    return found


def tensor_locations(directory: Path | str) -> dict[str, SourceTensor]:
    """Every tensor of the checkpoint in `directory`, from its headers alone (no weight byte is read).

    Raises:
        SourceError: A header is corrupt, or holds a dtype streaming cannot read.
    """
    found: dict[str, SourceTensor] = {}
    for path in weight_shards(Path(directory)):
        found.update(file_tensors(path))
    return found
