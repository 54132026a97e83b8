"""File modes that follow the user's umask.

`tempfile.mkstemp` makes its file 0600 and `mkdtemp` its directory 0700 (right for secrets, wrong for outputs): a
plan, a manifest, a score file or a cached model written through a temp file and renamed would stay private, and
the other users of a shared box (the one running the server) could not read it. Every such writer gives the file
the mode an ordinary `open()` would have: 0666 (0777 for directories) less the umask.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc/self/status, kernel 4.7+)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore at once (process-wide, so as briefly as possible)
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def ordinary_mode(directory: bool = False) -> int:
    """The mode `open()` (0666) or `mkdir()` (0777) would give under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def make_ordinary(tree: Path) -> None:
    """Give every file and folder under `tree` (itself included) the mode `open()` / `mkdir()` would have: some
    writers make private files (safetensors' `save_file` and `mkstemp` make them 0600)."""
    file_mode, dir_mode = ordinary_mode(), ordinary_mode(directory=True)
    os.chmod(tree, dir_mode)
    for root, dirs, files in os.walk(tree):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)
