"""Reading a small JSON file the user named (a plan, a job file) without trusting what the path is.

A path may be `/dev/zero` (endless), a FIFO nobody writes to (an open that blocks forever), `<(cat plan.json)` (a
pipe that can be read only once), or JSON nested thousands of levels deep (RecursionError in json and pydantic).
Each gives one line here instead of a hang, a MemoryError or a traceback. `-` is standard input.
"""

from __future__ import annotations

import json
import os
import stat
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from surgery.errors import UserError

MAX_BYTES = 256 * 1024 * 1024  # a plan naming every neuron of a 70B model is ~20 MB
MAX_DEPTH = 64  # plans nest 4 levels (plan, steps, step, list); provenance may nest a little more
STDIN = "-"  # `cat plan.json | workbench apply - --out DIR`


def read_limited(path: Path, what: str, max_bytes: int | None = None) -> bytes:
    """The bytes of the `what` file at `path`, read once; a regular file, a FIFO or a pipe, at most `max_bytes`.

    Raises:
        UserError: Missing, unreadable, not a file (a directory, a device), or larger than `max_bytes`.
    """
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    fd = _open(path, what)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"cannot read {what} file {path}: it is a directory")
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise UserError(f"cannot read {what} file {path}: not a regular file (a device or a socket)")
        if stat.S_ISREG(mode) and os.fstat(fd).st_size > max_bytes:
            raise UserError(f"{what} file {path} is larger than {max_bytes // 2**20} MiB: not a {what} file")
        os.set_blocking(fd, True)  # a pipe whose writer is there (`<(cat plan.json)`) is read to its end
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise UserError(f"{what} file {path} is larger than {max_bytes // 2**20} MiB: not a {what} file")
        return b"".join(chunks)
    except OSError as exc:
        raise UserError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _open(path: Path, what: str) -> int:
    """A descriptor for `path`, or a copy of standard input's for `-` (one line for a missing path, a terminal)."""
    if str(path) == STDIN:
        try:
            if os.isatty(0):  # reading would wait for typing: refuse instead of hanging
                raise UserError(f"{what} file '-' means standard input, which is a terminal: pipe the {what} in "
                                f"(`cat {what}.json | workbench ... -`)")
            return os.dup(0)
        except OSError as exc:
            raise UserError(f"cannot read the {what} from standard input: {exc.strerror or exc}") from None
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of blocking (it then reads as empty).
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"no such {what} file: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def _depth(data: Any) -> int:
    """Nesting depth of decoded JSON, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, array):  # a list of numbers an object_pairs_hook packed (surgery.indices)
            deepest = max(deepest, depth)
        elif isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json_file(path: Path, what: str, *, malformed: Callable[[str], Exception] = UserError,
                   max_depth: int = MAX_DEPTH, object_pairs_hook: Callable[[list], Any] | None = None) -> Any:
    """The decoded JSON of the `what` file at `path` (plan, job ...), read once; one-line errors that name the spot.
    `object_pairs_hook` is json.loads' (a plan file packs its index lists while it is decoded: surgery.indices).

    Raises:
        UserError: Missing, unreadable or not a file, too large.
        `malformed(message)`: Not UTF-8 JSON (line and column in the message), or nested deeper than `max_depth`.
    """
    path = Path(path)
    raw = read_limited(path, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise malformed(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from None
    if not text.strip():
        raise malformed(f"{path}: malformed JSON: the {what} file is empty")
    too_deep = f"{path}: JSON nested deeper than {max_depth} levels"
    try:
        data = json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as exc:
        raise malformed(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise malformed(too_deep) from None
    if _depth(data) > max_depth:
        raise malformed(too_deep)
    return data
