"""Screens of the workbench app."""
