"""Write safetensors shards tensor by tensor, byte-identical to `safetensors.torch.save_file`, hashing as it goes.

Memory stays a few chunks (`CHUNK`): unchanged tensors and row cuts are copied as byte ranges, column cuts and
dtype changes go through a few rows at a time. Only a low-rank factorisation holds a whole matrix (and its float64
SVD). Bytes are read with plain positioned reads, not through safetensors' mmap: mmapped pages a process touched
count in its resident set, so a 13 GB stream would look like 13 GB of RSS.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from surgery import ops
from surgery.stream.files import header_bytes
from surgery.stream.reads import CHUNK, TensorRead, row_windows
from surgery.stream.source import TORCH_NAMES, SourceTensor

_HASH_QUEUE = 4  # pieces waiting for the hash thread
_BUFFERS = _HASH_QUEUE + 2  # output buffers in rotation: one being filled, one being hashed, the queued ones


def torch_dtype(st: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return getattr(torch, TORCH_NAMES[st])


class SliceReader:
    """Positioned reads from the input files (kept open), packed into a rotation of output buffers.

    Why a rotation: each yielded view goes to the writer and then, by reference, to the hash thread; a buffer is
    refilled only after `_BUFFERS - 1` more pieces were yielded, when the hash queue's bound guarantees it has been
    hashed. So no piece is copied for the hash. Buffers are numpy arrays (uninitialised: no page is touched before
    it is read into) sized to the reads, at most CHUNK unless one row is bigger.
    """

    def __init__(self, sources: dict[str, SourceTensor]) -> None:
        self.sources = sources
        self._files: dict[Path, int] = {}
        self._out = [np.empty(0, np.uint8) for _ in range(_BUFFERS)]
        self._turn = 0
        self._scratch = np.empty(0, np.uint8)  # windows with gaps are read here, then gathered

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def _pread(self, path: Path, offset: int, n: int, buf: np.ndarray, into: int = 0) -> memoryview:
        """Read `n` bytes at `offset` into `buf` at position `into`; returns that part of the buffer."""
        fd = self._files.get(path)
        if fd is None:
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        view = memoryview(buf)[into : into + n]
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k == 0:
                raise OSError(f"{path}: unexpected end of file (truncated since its header was read?)")
            got += k
        return view

    def _buffer(self, size: int) -> np.ndarray:
        """This turn's output buffer, at least `size` bytes."""
        if len(self._out[self._turn]) < size:
            self._out[self._turn] = np.empty(size, np.uint8)
        return self._out[self._turn]

    def _handed_out(self, buf: np.ndarray, n: int) -> memoryview:
        """The first `n` bytes of this turn's buffer, yielded: the next fill goes to the next buffer."""
        self._turn = (self._turn + 1) % _BUFFERS
        return memoryview(buf)[:n]

    def _window(self, src: SourceTensor, a: int, b: int) -> memoryview:
        """Rows [a, b) of `src` in the scratch buffer."""
        n = (b - a) * src.row_bytes
        if len(self._scratch) < n:
            self._scratch = np.empty(n, np.uint8)
        return self._pread(src.file, src.start + a * src.row_bytes, n, self._scratch)

    def chunks(self, read: TensorRead) -> Iterator[memoryview]:
        """The output bytes of a (non-factor) read, chunk by chunk; each view stays valid for `_BUFFERS - 1` more."""
        if read.source is None:
            return
        src = self.sources[read.source]
        n_rows = src.shape[0] if src.shape else 1
        rb = src.row_bytes
        windows = row_windows(read.rows, n_rows, rb)
        if read.cols is None and src.dtype == read.dtype:
            # byte ranges only, no tensor is built: packed into one buffer before it is yielded, so the writes stay
            # few and large; a window with gaps is read whole and its kept rows gathered
            total = sum(stop - start for _, _, runs in windows for start, stop in runs) * rb
            buf, fill = self._buffer(min(total, CHUNK)), 0
            for a, b, runs in windows:
                kept = sum(stop - start for start, stop in runs) * rb
                if fill and fill + kept > len(buf):
                    yield self._handed_out(buf, fill)
                    buf, fill = self._buffer(min(total, CHUNK)), 0
                if kept > len(buf):  # one row longer than CHUNK
                    buf = self._buffer(kept)
                if len(runs) == 1:
                    self._pread(src.file, src.start + a * rb, kept, buf, into=fill)
                else:
                    rows = np.frombuffer(self._window(src, a, b), dtype=np.uint8).reshape(b - a, rb)
                    local = np.concatenate([np.arange(start - a, stop - a) for start, stop in runs])
                    # mode="clip": numpy buffers `out` under the default mode (the indices are in range anyway)
                    np.take(rows, local, axis=0, out=buf[fill : fill + kept].reshape(-1, rb), mode="clip")
                fill += kept
                total -= kept
            if fill:
                yield self._handed_out(buf, fill)
            return
        cols = None if read.cols is None else torch.tensor(read.cols.tolist(), dtype=torch.long)
        dtype, out_dtype = torch_dtype(src.dtype), torch_dtype(read.dtype)
        for a, b, runs in windows:
            raw = self._window(src, a, b)
            t = torch.frombuffer(raw, dtype=dtype).view(b - a, *src.shape[1:]) if src.shape else \
                torch.frombuffer(raw, dtype=dtype).view(())
            if len(runs) > 1:
                t = t.index_select(0, torch.cat([torch.arange(start - a, stop - a) for start, stop in runs]))
            if cols is not None:
                t = t.index_select(1, cols)
            t = t.to(out_dtype).contiguous()
            if t.data_ptr() == torch.frombuffer(raw, dtype=dtype).data_ptr():
                t = t.clone()  # still a view of the scratch buffer, which the next window overwrites
            yield memoryview(t.reshape(-1).view(torch.uint8).numpy())

    def tensor(self, read: TensorRead) -> torch.Tensor:
        """A read as one tensor in memory (for a low-rank factorisation)."""
        src = self.sources[read.source]
        shape = list(src.shape)
        for dim, kept in ((0, read.rows), (1, read.cols)):
            if kept is not None:
                shape[dim] = len(kept)
        out = torch.empty(shape, dtype=torch_dtype(read.dtype))
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
    go to it by reference, at most `_HASH_QUEUE` in flight (see SliceReader for why that keeps them valid);
    `threaded=False` hashes inline instead (on a box whose cores are all busy the thread buys nothing). Files
    are not fsynced here: `surgery.export.save_model_dir` fsyncs every file of the directory once, before the
    rename that publishes it.
    """

    def __init__(self, threaded: bool = True) -> None:
        self.hash = hashlib.sha256()
        self.bytes_written = 0
        self._queue: queue.Queue | None = None
        if threaded:
            self._queue = queue.Queue(_HASH_QUEUE)
            self._thread = threading.Thread(target=self._hash_loop, daemon=True)
            self._thread.start()

    def _hash_loop(self) -> None:
        while (piece := self._queue.get()) is not None:
            self.hash.update(piece)

    def _hash(self, piece) -> None:
        if self._queue is None:
            self.hash.update(piece)
        else:
            self._queue.put(piece)

    def write_file(self, path: Path, pieces: Iterator[memoryview | bytes], cancel: threading.Event | None) -> None:
        self._hash(path.name.encode("utf-8"))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # as open(): umask decides
        try:
            for piece in pieces:
                if cancel is not None and cancel.is_set():
                    raise KeyboardInterrupt("cancelled")
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
                self._hash(piece)
                self.bytes_written += len(piece)
        finally:
            os.close(fd)

    def close(self) -> str:
        """Wait for the hash to catch up; returns the fingerprint ("sha256:<hex>")."""
        if self._queue is not None:
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
