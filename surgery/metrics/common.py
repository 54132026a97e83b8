"""Pieces every metric shares: progress events, cancellation, timing statistics, the device description.

Long metric calls take `progress: Callable[[ProgressEvent], None] | None` and `cancel: threading.Event | None`.
Progress is reported once per batch (or per repeat); a front end may drop or merge events freely. When `cancel`
is set, the call stops at the next batch boundary and raises `Cancelled`.
"""

from __future__ import annotations

import platform
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class Cancelled(Exception):
    """The caller set the cancel event; the metric stopped at a batch boundary and returned nothing."""


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long evaluation.

    Attributes:
        task: what is running ("perplexity", "agreement", "speed", "loading", ...).
        done: units finished so far.
        total: units in all, or None for a plain status message.
        model: the model being evaluated (as the user named it), when known.
        message: optional text for a status line.
    """

    task: str
    done: int = 0
    total: int | None = None
    model: str = ""
    message: str = ""


ProgressFn = Callable[[ProgressEvent], None] | None


def emit(progress: ProgressFn, task: str, done: int = 0, total: int | None = None, *, model: str = "",
         message: str = "") -> None:
    """Call `progress` with an event if there is a callback."""
    if progress is not None:
        progress(ProgressEvent(task, done, total, model, message))


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise `Cancelled` when the caller asked to stop."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("evaluation cancelled")


def median_spread(samples: list[float]) -> tuple[float, float]:
    """The median of `samples` and their spread, half the range ((max - min) / 2)."""
    if not samples:
        raise ValueError("no samples")
    return statistics.median(samples), (max(samples) - min(samples)) / 2


def device_name(device: str) -> str:
    """A description of the hardware behind `device`, precise enough to key speed records.

    CPU: processor/machine and torch's intra-op thread count; CUDA: the GPU's name.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    if dev.type == "mps":
        return f"mps: {platform.machine()}"
    return f"cpu: {_cpu_model()}, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:  # Linux: the marketing name ("AMD EPYC 7B13"); platform.processor() only says "x86_64" there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timer reads the work's end and not its launch."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()
