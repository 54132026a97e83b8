"""The terminal workbench: a typer CLI (and, later, a Textual app) over the `surgery` library."""
