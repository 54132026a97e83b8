"""`workbench rec ...` (recommendation-tasks issue): in progress."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Recommendation tasks: prepare, train, distill, eval.")
