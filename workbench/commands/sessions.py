"""`workbench open` and `workbench sessions ...` (sessions issue): in progress."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Sessions: list, show, export, replay, rm.")


def open_session() -> None:
    """Create or resume a session (not yet built)."""
    raise NotImplementedError("workbench open lands with the sessions issue")
