"""Shared pieces of the CLI: option aliases, consoles, progress, JSON output."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console

out = Console(soft_wrap=True)  # results (stdout)
err = Console(stderr=True, soft_wrap=True)  # progress and messages (stderr)

ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="Model source: HF directory, hub id, .gguf file or smollm2-135m.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout, nothing else.")]
AllowPickleOpt = Annotated[
    bool, typer.Option("--allow-pickle", help="Accept pickled .bin/.pt weights (read with weights_only=True).")
]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run model code shipped with a hub repo (off by default).")
]


def print_json(data: Any) -> None:
    """One JSON document on stdout (sorted keys, so output diffs cleanly)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


@contextmanager
def status(enabled: bool):
    """A spinner on stderr whose text follows the library's progress messages; a no-op when disabled."""
    if not enabled or not err.is_terminal:
        yield lambda message: None
        return
    with err.status("starting") as spinner:
        yield lambda message: spinner.update(message)


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
