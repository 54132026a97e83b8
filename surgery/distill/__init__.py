"""Distillation: pure loss functions (`losses`), the versioned job file (`config`) and the training loop (`loop`).

The loop runs inside a job process (see `surgery.jobs`); the losses are plain functions usable anywhere.
"""
