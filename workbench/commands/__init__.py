"""One module per command group of the `workbench` CLI."""
