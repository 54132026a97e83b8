"""`workbench distill` and `workbench jobs ...` (distillation-jobs issue): in progress."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Background jobs: list, show, logs, cancel, resume.")


def distill() -> None:
    """Start a distillation job (not yet built)."""
    raise NotImplementedError("workbench distill lands with the distillation-jobs issue")
