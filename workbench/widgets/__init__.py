"""Widgets of the workbench app."""
