"""End to end in a real terminal: the app under tmux at 100x30 on the demo model, keys sent with send-keys, the
screen read back with capture-pane. Skipped (with the reason) where tmux is not installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = [pytest.mark.demo, pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30).stdout


def wait_for(session: str, text: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if text in screen:
            return screen
        time.sleep(0.25)
    raise AssertionError(f"{text!r} never appeared; last screen:\n{screen}")


def test_demo_model_in_tmux(tmp_path):
    from surgery.errors import SourceError
    from surgery.sources import resolve_source

    try:
        resolve_source("smollm2-135m")
    except SourceError as e:
        pytest.skip(f"demo model unavailable: {e}")
    session = f"wb-{uuid.uuid4().hex[:6]}"
    cmd = f"cd {tmp_path} && {sys.executable} -c 'from workbench.cli import main; main()'"
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", cmd)
    try:
        screen = wait_for(session, "1536/1536")  # the layer table, drawn from the headers
        assert "9/9" in screen and "1536/1536" in screen and "params" in screen
        tmux("send-keys", "-t", session, "Down", "Down", "Space")  # drop layer 2
        screen = wait_for(session, "DROPPED")
        # the totals: one layer (3.54M of 134.5M parameters) removed; may wait for the weight load to finish
        wait_for(session, "-2.6%", timeout=180)
        tmux("send-keys", "-t", session, "Enter")  # layer screen of the row under the cursor
        screen = wait_for(session, "KV  2")
        tmux("send-keys", "-t", session, "Escape")
        wait_for(session, "drop layer")  # back on the model screen (its footer)
        tmux("send-keys", "-t", session, "?")
        wait_for(session, "everywhere")
        tmux("send-keys", "-t", session, "Escape", "q")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and session in tmux("list-sessions"):
            time.sleep(0.2)
    finally:
        tmux("kill-session", "-t", session)
