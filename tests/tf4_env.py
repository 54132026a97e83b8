"""transformers 4.x beside the project's transformers 5, for tests that judge our configs with an old reader.

Installed with `--no-deps --target .ci/tf4` (torch, numpy, safetensors come from the environment), into a temporary
sibling renamed at the end, so a killed install never leaves a half-filled directory that later runs would trust.
`.ci/run` calls this once per CI run (`python tests/tf4_env.py`); the test fixture calls it too, so a second call is
a no-op. Tests put TF4_DIR on PYTHONPATH of a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TF4_DIR = Path(__file__).resolve().parent.parent / ".ci" / "tf4"
# 4.47.1: the release the issue measured; tokenizers and huggingface-hub pinned to what it accepts at import
REQUIREMENTS = ("transformers==4.47.1", "tokenizers>=0.21,<0.22", "huggingface-hub>=0.24,<1.0")


def ensure_tf4() -> Path:
    """Install transformers 4.x into TF4_DIR unless it is already there; returns TF4_DIR."""
    if (TF4_DIR / "transformers").is_dir():
        return TF4_DIR
    tmp = TF4_DIR.with_name(f".tf4.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                        *REQUIREMENTS], check=True, timeout=900)
        os.replace(tmp, TF4_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TF4_DIR


if __name__ == "__main__":
    print(ensure_tf4())
