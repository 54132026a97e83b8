"""Write safetensors shards tensor by tensor, byte-identical to `safetensors.torch.save_file`, hashing as it goes.

Memory stays a few chunks (`CHUNK`, 1 MB): unchanged tensors and row cuts are read as byte ranges straight into
the output buffers (one positioned read per stretch of kept rows, small gaps read through into a scratch buffer),
column cuts are gathered with numpy a window of rows at a time (whole blocks of columns when the cut keeps aligned
blocks, e.g. attention heads), dtype changes go through torch a window at a time. Only a low-rank factorisation
holds a whole matrix (and its float64 SVD). Bytes are read with plain positioned reads, not through safetensors'
mmap: mmapped pages a process touched count in its resident set, so a 13 GB stream would look like 13 GB of RSS.

Why not copy_file_range for the unchanged byte ranges (in-kernel, no user-space copy)? The output's sha256 still
needs every byte in user space, and the hash, not the copy, is the slowest stage (~1.1 GB/s on one core here
against ~2.5 GB/s for the kernel's copy): measured on this box, a 1 MB pread + sha256 costs 0.82 s of CPU per GB
and copy_file_range another 0.38, while pread + write of the same 1 MB buffer costs 0.43-0.70 and the hash thread
then reads the buffer it was handed (0.7-0.9); so the copy would move work onto the hash thread, the bottleneck.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from surgery import ops
from surgery.errors import SourceError
from surgery.stream.files import header_bytes
from surgery.stream.reads import (
    CHUNK, GAP_BYTES, TensorRead, _run_array, group_spans, int64_indices, read_groups,
)
from surgery.stream.source import TORCH_NAMES, SourceTensor

_HASH_QUEUE = 8  # pieces waiting for the hash thread
_BUFFERS = _HASH_QUEUE + 2  # output buffers in rotation: one being filled, one being hashed, the queued ones
_IOV_MAX = 1024  # iovecs one preadv takes (Linux's UIO_MAXIOV)
_WRITEBACK_BYTES = 8 * 1024 * 1024  # written bytes between two writeback starts
_SYNC_FILE_RANGE_WRITE = 2


def _writeback_starter() -> Callable[[int, int, int], int] | None:
    """Linux's sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE): start writing a range's dirty pages to
    disk without waiting for it (None where the C library has no such call)."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # no such symbol (macOS), no CDLL(None) (Windows)
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return lambda fd, offset, n: call(fd, offset, n, _SYNC_FILE_RANGE_WRITE)


# Why: the output directory is fsynced before it is published (surgery.export.atomic), and that fsync otherwise
# waits for every byte still dirty in the page cache: for the demo, 430 MB after the last write. Started as the
# file is written, the disk writes beside the stream and the fsync waits for the last few MB. Durability is the
# same (the fsync still decides); this only moves the disk's work earlier.
_START_WRITEBACK = _writeback_starter()


def torch_dtype(st: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return getattr(torch, TORCH_NAMES[st])


def column_blocks(cols, n_cols: int) -> tuple[np.ndarray, int]:
    """The kept columns as (block indices, columns per block): the largest block size k such that the cut keeps
    whole aligned blocks of k columns (a head cut keeps whole heads: k >= head_dim), so each is one memcpy."""
    runs = _run_array(cols, n_cols)
    k = int(np.gcd.reduce(np.concatenate([runs.ravel(), [n_cols]]))) if len(runs) else 1
    c = int64_indices(cols)
    return c[c % k == 0] // k, max(k, 1)


class SliceReader:
    """Positioned reads from the input files (kept open), packed into a rotation of output buffers.

    Why a rotation: each yielded view goes to the writer and then, by reference, to the hash thread; a buffer is
    refilled only after `_BUFFERS - 1` more pieces were yielded, when the hash queue's bound guarantees it has been
    hashed. So no piece is copied for the hash. Buffers are numpy arrays (uninitialised: no page is touched before
    it is read into) of CHUNK bytes, or one output row when that is bigger.
    """

    def __init__(self, sources: dict[str, SourceTensor]) -> None:
        self.sources = sources
        self._files: dict[Path, int] = {}
        self._out = [np.empty(0, np.uint8) for _ in range(_BUFFERS)]
        self._turn = 0
        self._scratch = np.empty(0, np.uint8)  # the rows a column cut or dtype change reads, before the cut
        self._gap = memoryview(np.empty(GAP_BYTES, np.uint8))  # read-through gaps land here (never looked at)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def _fd(self, path: Path) -> int:
        fd = self._files.get(path)
        if fd is None:
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        return fd

    def _preadv(self, path: Path, offset: int, views: list[memoryview]) -> None:
        """Fill `views`, in order, from the contiguous bytes of `path` at `offset` (short reads continued)."""
        fd, first = self._fd(path), 0
        while first < len(views):
            k = os.preadv(fd, views[first : first + _IOV_MAX], offset)
            if k == 0:
                raise SourceError(f"{path}: unexpected end of file (truncated since its header was read?)")
            offset += k
            while first < len(views) and k >= len(views[first]):
                k -= len(views[first])
                first += 1
            if k:
                views[first] = views[first][k:]

    def _buffer(self, size: int) -> np.ndarray:
        """This turn's output buffer, at least `size` bytes."""
        if len(self._out[self._turn]) < size:
            self._out[self._turn] = np.empty(max(size, CHUNK), np.uint8)
        return self._out[self._turn]

    def _handed_out(self, buf: np.ndarray, n: int) -> memoryview:
        """The first `n` bytes of this turn's buffer, yielded: the next fill goes to the next buffer."""
        self._turn = (self._turn + 1) % _BUFFERS
        return memoryview(buf)[:n]

    def _window(self, src: SourceTensor, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of `src` in the scratch buffer, as bytes."""
        n = (b - a) * src.row_bytes
        if len(self._scratch) < n:
            self._scratch = np.empty(max(n, CHUNK), np.uint8)
        self._preadv(src.file, src.start + a * src.row_bytes, [memoryview(self._scratch)[:n]])
        return self._scratch[:n]

    def chunks(self, read: TensorRead) -> Iterator[memoryview]:
        """The output bytes of a (non-factor) read, chunk by chunk; each view stays valid for `_BUFFERS - 1` more."""
        if read.source is None:
            return
        src = self.sources[read.source]
        n_rows = src.shape[0] if src.shape else 1
        if read.cols is None and src.dtype == read.dtype:
            yield from self._row_bytes(src, read.rows, n_rows)
        else:
            yield from self._windows(src, read, n_rows)

    def _row_bytes(self, src: SourceTensor, rows, n_rows: int) -> Iterator[memoryview]:
        """Kept rows as byte ranges, read straight into the output buffers: one preadv per group of runs (its small
        gaps scattered into the gap buffer), split where a buffer fills."""
        rb = src.row_bytes
        runs, group = read_groups(rows, n_rows, rb)
        left = int((runs[:, 1] - runs[:, 0]).sum()) * rb
        starts, stops = (src.start + runs[:, 0] * rb).tolist(), (src.start + runs[:, 1] * rb).tolist()
        buf, fill = self._buffer(min(left, CHUNK)), 0
        views: list[memoryview] = []
        read_at = end = 0  # file offsets: where `views` start, and the end of the last run taken
        prev = -1
        for s, e, g in zip(starts, stops, group.tolist()):
            if views and g != prev:
                self._preadv(src.file, read_at, views)
                views = []
            if g == prev:  # a gap inside the group: read through, into the gap buffer
                if not views:
                    read_at = end
                views.append(self._gap[: s - end])
            elif not views:
                read_at = s
            prev = g
            while s < e:
                if fill == len(buf):
                    self._preadv(src.file, read_at, views)
                    views, read_at = [], s
                    yield self._handed_out(buf, fill)
                    buf, fill = self._buffer(min(left, CHUNK)), 0
                n = min(e - s, len(buf) - fill)
                views.append(memoryview(buf)[fill : fill + n])
                fill, s, left = fill + n, s + n, left - n
            end = e
        if views:
            self._preadv(src.file, read_at, views)
        if fill:
            yield self._handed_out(buf, fill)

    def _windows(self, src: SourceTensor, read: TensorRead, n_rows: int) -> Iterator[memoryview]:
        """A column cut or a dtype change: whole rows read a window (<= CHUNK) at a time, then cut / converted."""
        rb = src.row_bytes
        spans = group_spans(*read_groups(read.rows, n_rows, rb))
        kept = None if read.rows is None else int64_indices(read.rows)
        per_window = max(1, CHUNK // max(rb, 1))
        same_dtype = src.dtype == read.dtype
        # a dtype change converts through torch: its column index is built once per read, not once per window
        cols = torch.from_numpy(int64_indices(read.cols).copy()) if read.cols is not None and not same_dtype else None
        if read.cols is not None and same_dtype:
            n_cols = src.shape[1]
            blocks, k = column_blocks(read.cols, n_cols)
            block_bytes = k * math.prod(src.shape[2:]) * src.itemsize
        for a, b in spans.tolist():
            for w0 in range(a, b, per_window):
                w1 = min(b, w0 + per_window)
                raw = self._window(src, w0, w1)
                local = None
                if kept is not None:
                    lo, hi = np.searchsorted(kept, [w0, w1])
                    if hi - lo < w1 - w0:  # the window holds dropped rows (read-through gaps)
                        local = kept[lo:hi] - w0
                if not same_dtype:
                    yield self._converted(src, read, raw, w1 - w0, local, cols)
                    continue
                rows = raw.reshape(w1 - w0, n_cols // k, block_bytes)
                n_out = (w1 - w0 if local is None else len(local)) * len(blocks) * block_bytes
                if not n_out:
                    continue
                out = self._buffer(n_out)[:n_out].reshape(-1, len(blocks), block_bytes)
                if local is None:
                    # mode="clip": numpy buffers `out` under the default mode (the indices are in range anyway)
                    np.take(rows, blocks, axis=1, out=out, mode="clip")
                else:
                    out[...] = rows[np.ix_(local, blocks)]
                yield self._handed_out(out.reshape(-1), n_out)

    def _converted(self, src: SourceTensor, read: TensorRead, raw: np.ndarray, n: int, local, cols) -> memoryview:
        """A window of rows cut (`cols`: the kept columns as a torch index, or None) and converted to the output
        dtype by torch (a new tensor: the scratch is reused)."""
        flat = torch.from_numpy(raw).view(torch_dtype(src.dtype))
        t = flat.view(n, *src.shape[1:]) if src.shape else flat.view(())
        if local is not None:
            t = t.index_select(0, torch.from_numpy(local))
        if cols is not None:
            t = t.index_select(1, cols)
        t = t.to(torch_dtype(read.dtype)).contiguous()
        if t.data_ptr() == flat.data_ptr():
            t = t.clone()  # still a view of the scratch buffer, which the next window overwrites
        return memoryview(t.reshape(-1).view(torch.uint8).numpy())

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
        # through a rotation of its own: this read comes between two pieces of the stream, and its chunks would
        # refill the shared buffers while pieces of them still wait in the hash queue (a wrong fingerprint)
        own = SliceReader(self.sources)
        own._files = self._files  # the open files are shared (closed with this reader)
        for chunk in own.chunks(read):
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


def hash_thread_pays() -> bool:
    """Whether hashing beside the reads and writes can be faster than inline: two idle cores (one for each thread),
    judged by the CPUs this process may use minus the 1-minute load average.

    Measured on the 2-core box of docs/benchmarks.md (load 0.2-0.8, so about one core idle): the demo's write
    0.70-0.80 s wall threaded against 0.67-0.70 s inline, a 4-layer 7B-shaped stream 2.64 s against 2.59 s, with CPU
    seconds equal to wall (nothing overlapped) and ~7% more CPU for the thread's hand-offs."""
    try:
        cpus = len(os.sched_getaffinity(0))
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Linux: cpu_count, and no load figure
        return (os.cpu_count() or 1) >= 4
    return cpus - load >= 2


class HashingWriter:
    """Writes files one after another while feeding a single sha256 with each file's name and bytes, exactly as
    `surgery.fingerprint.weights_fingerprint` hashes a directory (files in sorted name order).

    The hash runs in a thread beside the reads and writes (hashlib releases the GIL on large buffers): sha256 is
    slower than a disk copy on these machines, so hashing inline would cap the stream at the hash's speed. Pieces
    go to it by reference, at most `_HASH_QUEUE` in flight (see SliceReader for why that keeps them valid);
    `threaded=False` hashes inline instead, and the default (None) threads only where two cores are idle
    (`hash_thread_pays`): on a box without them the thread buys nothing and its hand-offs cost CPU. Files
    are not fsynced here: `surgery.export.save_model_dir` fsyncs every file of the directory once, before the
    rename that publishes it; their writeback is started every `_WRITEBACK_BYTES` (`_START_WRITEBACK`) so that
    fsync finds little left to write.
    """

    def __init__(self, threaded: bool | None = None) -> None:
        if threaded is None:
            threaded = hash_thread_pays()
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
        start_writeback = _START_WRITEBACK
        pos = flushed = 0
        try:
            for piece in pieces:
                if cancel is not None and cancel.is_set():
                    raise KeyboardInterrupt("cancelled")
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
                self._hash(piece)
                self.bytes_written += len(piece)
                pos += len(piece)
                if start_writeback is not None and pos - flushed >= _WRITEBACK_BYTES:
                    if start_writeback(fd, flushed, pos - flushed) != 0:
                        start_writeback = None  # unsupported here (a file system without it): the fsync does it all
                    flushed = pos
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
            flat = memoryview(factors.get(read).reshape(-1).view(torch.uint8).numpy())
            for at in range(0, len(flat), CHUNK):  # CHUNK-sized writes and hash pieces, as every other tensor's
                yield flat[at : at + CHUNK]
        else:
            yield from reader.chunks(read)
        tick(read)
