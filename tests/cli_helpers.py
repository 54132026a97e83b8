"""Helpers for tests that drive the CLI through `workbench.cli.run` (imported by the CLI test files)."""

from __future__ import annotations

from workbench.cli import run


def call(capsys, *argv):
    """Run the CLI with `argv` (str() of each); returns (exit code, stdout, stderr)."""
    code = run([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    """Assert `err` is exactly one non-blank line starting with "error: "; returns it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]
