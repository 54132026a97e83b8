"""Textual themes for the workbench app (lands with the TUI issue)."""
