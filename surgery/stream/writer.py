"""Write safetensors shards tensor by tensor, byte-identical to `safetensors.torch.save_file`, hashing as it goes.

Memory stays about one chunk (`CHUNK`): unchanged tensors and row cuts are copied as byte ranges, column cuts and
dtype changes go through a few rows at a time. Only a low-rank factorisation holds a whole matrix (and its float64
SVD). Bytes are read with plain positioned reads, not through safetensors' mmap: mmapped pages a process touched
count in its resident set, so a 13 GB stream would look like 13 GB of RSS.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from surgery import ops
from surgery.stream.reads import TensorRead
from surgery.stream.source import TORCH_TO_ST, SourceTensor

CHUNK = 16 * 1024 * 1024
METADATA = {"format": "pt"}  # what save_pretrained passes to safetensors


def file_order(reads: list[TensorRead]) -> list[TensorRead]:
    """The order safetensors lays tensors out in a file (by dtype, then name), asked of safetensors itself with
    zero-length stand-ins, so a later safetensors that sorts otherwise is followed, not guessed."""
    from safetensors.torch import save

    raw = save({r.name: torch.empty(0, dtype=r.dtype) for r in reads})
    n = int.from_bytes(raw[:8], "little")
    names = [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]
    by_name = {r.name: r for r in reads}
    return [by_name[k] for k in names]


def header_bytes(ordered: list[TensorRead]) -> bytes:
    """8-byte length + the JSON header (compact, metadata first, space-padded to 8 bytes), as safetensors writes."""
    header: dict = {"__metadata__": METADATA}
    offset = 0
    for r in ordered:
        header[r.name] = {"dtype": TORCH_TO_ST[r.dtype], "shape": list(r.shape), "data_offsets": [offset, offset + r.nbytes]}
        offset += r.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _runs(indices: tuple[int, ...] | None, length: int) -> list[tuple[int, int]]:
    """Kept indices as [start, stop) runs of consecutive values (all of 0..length when None)."""
    if indices is None:
        return [(0, length)]
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class SliceReader:
    """Positioned reads from the input files (kept open), into one reusable buffer."""

    def __init__(self, sources: dict[str, SourceTensor]) -> None:
        self.sources = sources
        self._files: dict[Path, int] = {}
        self._buf = bytearray(CHUNK)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def _pread(self, path: Path, offset: int, n: int, into: int = 0) -> memoryview:
        """Read `n` bytes at `offset` into the buffer at position `into`; returns that part of the buffer."""
        fd = self._files.get(path)
        if fd is None:
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        if into + n > len(self._buf):
            self._buf = bytearray(into + n)
        view = memoryview(self._buf)[into : into + n]
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k == 0:
                raise OSError(f"{path}: unexpected end of file (truncated since its header was read?)")
            got += k
        return view

    def chunks(self, read: TensorRead) -> Iterator[memoryview]:
        """The output bytes of a (non-factor) read, chunk by chunk; each view is valid until the next one."""
        if read.source is None:
            return
        src = self.sources[read.source]
        n_rows = src.shape[0] if src.shape else 1
        rb = src.row_bytes
        if read.cols is None and src.dtype == read.dtype:
            # pure byte ranges, no tensor is ever built; runs (a neuron cut keeps many short ones) are packed into
            # one CHUNK before it is written, so the writes stay few and large
            fill = 0
            for a, b in _runs(read.rows, n_rows):
                pos, end = src.start + a * rb, src.start + b * rb
                while pos < end:
                    n = min(CHUNK - fill, end - pos)
                    self._pread(src.file, pos, n, into=fill)
                    fill, pos = fill + n, pos + n
                    if fill == CHUNK:
                        yield memoryview(self._buf)[:fill]
                        fill = 0
            if fill:
                yield memoryview(self._buf)[:fill]
            return
        cols = None if read.cols is None else torch.tensor(read.cols, dtype=torch.long)
        per_chunk = max(1, CHUNK // max(rb, 1))
        for a, b in _runs(read.rows, n_rows):
            for start in range(a, b, per_chunk):
                k = min(per_chunk, b - start)
                raw = self._pread(src.file, src.start + start * rb, k * rb)
                t = torch.frombuffer(raw, dtype=src.dtype).view(k, *src.shape[1:]) if src.shape else \
                    torch.frombuffer(raw, dtype=src.dtype).view(())
                if cols is not None:
                    t = t.index_select(1, cols)
                t = t.to(read.dtype).contiguous()
                yield memoryview(t.reshape(-1).view(torch.uint8).numpy())

    def tensor(self, read: TensorRead) -> torch.Tensor:
        """A read as one tensor in memory (for a low-rank factorisation)."""
        src = self.sources[read.source]
        shape = list(src.shape)
        for dim, kept in ((0, read.rows), (1, read.cols)):
            if kept is not None:
                shape[dim] = len(kept)
        out = torch.empty(shape, dtype=read.dtype)
        flat = out.reshape(-1).view(torch.uint8).numpy()
        pos = 0
        for chunk in self.chunks(read):
            flat[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        return out


class FactorCache:
    """The (B, A) factors of low-rank modules, computed on first use and dropped once both have been written."""

    def __init__(self, reader: SliceReader) -> None:
        self.reader = reader
        self._factors: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, read: TensorRead) -> torch.Tensor:
        f = read.factor
        if f.module not in self._factors:
            weight = self.reader.tensor(f.weight)
            # the same call, on the same contiguous cut weight (Conv1D: its transposed view), as surgery.ops.low_rank
            b, a = ops.low_rank_factors(weight.t() if f.conv1d else weight, f.rank)
            self._factors[f.module] = {"a": a.contiguous(), "b": b.contiguous()}
        parts = self._factors[f.module]
        t = parts.pop(f.part)
        if not parts:
            del self._factors[f.module]
        return t


class HashingWriter:
    """Writes files one after another while feeding a single sha256 with each file's name and bytes, exactly as
    `surgery.fingerprint.weights_fingerprint` hashes a directory (files in sorted name order).

    The hash runs in a thread beside the reads and writes (hashlib releases the GIL on large buffers): sha256 is
    slower than a disk copy on these machines, so hashing inline would cap the stream at the hash's speed. Pieces
    are copied into a bounded queue (at most `_QUEUE` chunks in flight) because the reader reuses its buffer.
    """

    _QUEUE = 4

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.bytes_written = 0
        self._queue: queue.Queue = queue.Queue(self._QUEUE)
        self._thread = threading.Thread(target=self._hash_loop, daemon=True)
        self._thread.start()

    def _hash_loop(self) -> None:
        while (piece := self._queue.get()) is not None:
            self.hash.update(piece)

    def write_file(self, path: Path, pieces: Iterator[memoryview | bytes], cancel: threading.Event | None) -> None:
        self._queue.put(path.name.encode("utf-8"))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # as open(): umask decides
        try:
            for piece in pieces:
                if cancel is not None and cancel.is_set():
                    raise KeyboardInterrupt("cancelled")
                self._queue.put(bytes(piece))
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
                self.bytes_written += len(piece)
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> str:
        """Wait for the hash to catch up; returns the fingerprint ("sha256:<hex>")."""
        self._queue.put(None)
        self._thread.join()
        return "sha256:" + self.hash.hexdigest()


def shard_pieces(
    ordered: list[TensorRead], reader: SliceReader, factors: FactorCache, tick: Callable[[TensorRead], None]
) -> Iterator[memoryview | bytes]:
    """Header, then every tensor's bytes in file order."""
    yield header_bytes(ordered)
    for read in ordered:
        if read.factor is not None:
            t = factors.get(read)
            yield memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
        else:
            yield from reader.chunks(read)
        tick(read)
