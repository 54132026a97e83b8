"""Distillation: the loss functions, the versioned job file, and the training step and loop.

Modules: `losses` (pure functions, shapes documented), `config` (the job file), `prepare` (config-only checks, then
models and data), `world` (one process or one torchrun rank), `loop` (the step, the loop, checkpointable state).
The loop runs inside a job process (see `surgery.jobs`); the losses are plain functions usable anywhere.
"""
