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
    # its own home: `workbench` keeps the demo's default session, which must not carry marks from another run
    cmd = (f"cd {tmp_path} && WORKBENCH_HOME={tmp_path / 'home'} {sys.executable} -c "
           "'from workbench.cli import main; main()'")
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


def test_workbench_keeps_single_head_marks_on_a_gqa_layer_across_quit_at_80x24(tmp_path):
    """`workbench` (no command) opens the demo in its default session; single query heads of a GQA layer (9 heads,
    3 KV groups) are picked one by one: pending until one per group, then in the plan; `q`, reopen, still there."""
    from surgery.errors import SourceError
    from surgery.sources import resolve_source

    try:
        resolve_source("smollm2-135m")
    except SourceError as e:
        pytest.skip(f"demo model unavailable: {e}")
    cmd = (f"cd {tmp_path} && WORKBENCH_HOME={tmp_path / 'home'} {sys.executable} -c "
           "'from workbench.cli import main; main()'")

    def start() -> str:
        name = f"wb-{uuid.uuid4().hex[:6]}"
        tmux("new-session", "-d", "-s", name, "-x", "80", "-y", "24", cmd)
        wait_for(name, "1536/1536")
        return name

    def quit_(name: str) -> None:
        tmux("send-keys", "-t", name, "Escape")
        wait_for(name, "drop layer")  # on the model screen (an Escape sent with `q` reads as alt+q)
        tmux("send-keys", "-t", name, "q")
        deadline = time.monotonic() + 90  # a weight load still running in its thread finishes first
        while time.monotonic() < deadline and name in tmux("list-sessions"):
            time.sleep(0.2)
        assert name not in tmux("list-sessions"), "q did not quit:\n" + tmux("capture-pane", "-p", "-t", name)

    session = start()
    try:
        assert "session smollm2-135m" in tmux("capture-pane", "-p", "-t", session)  # named in the header
        tmux("send-keys", "-t", session, "Enter")  # layer 0
        wait_for(session, "KV  2")
        tmux("send-keys", "-t", session, "Space")  # head 0 alone: pending, says what GQA still needs
        wait_for(session, "pending")
        tmux("send-keys", "-t", session, "Down", "Space")  # head 3 (group 1): still pending
        tmux("send-keys", "-t", session, "Down", "Space")  # head 6 (group 2): one per group -> in the plan
        wait_for(session, "heads 6/9")
        quit_(session)
    finally:
        tmux("kill-session", "-t", session)
    session = start()
    try:
        screen = wait_for(session, "6/9")  # layer 0's row: the marks came back with the session
        assert "9/9" in screen
        tmux("send-keys", "-t", session, "Enter")
        screen = wait_for(session, "×h6")
        assert "×h0" in screen and "×h3" in screen and "pending" not in screen
        quit_(session)
    finally:
        tmux("kill-session", "-t", session)
    from sessions import Session

    with Session.open("smollm2-135m", root=tmp_path / "home" / "sessions", readonly=True) as s:
        assert s.marked("heads", 0) == {0, 3, 6}
