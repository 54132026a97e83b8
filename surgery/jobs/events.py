"""The append-only event log of a job (events.jsonl): one JSON object per line, sorted keys.

Every event has "event" (its type) and "time" (Unix seconds). Types:

    launch      pid, attempt, command (written by the launcher when it spawns the process)
    status      message (what the job is doing before its first step: loading, tokenizing)
    start       step (steps already finished: where this attempt starts), pid, world_size, device,
                resumed_from (checkpoint name or null), train (the training data's description and fingerprint)
    step        step (1-based count of finished steps), losses {term: value, ..., "total": value}, lr, grad_norm,
                tokens_per_s, eta_s, elapsed_s
    eval        step, perplexity, nll_per_token, targets, data_fingerprint
    checkpoint  step, path
    checkpoint_failed   step, error (the previous checkpoint is still the latest valid one)
    done        step, output, manifest (final eval included)
    failed      step, error, error_type, traceback
    cancelled   step, checkpoint

A resumed job appends a new `start`; readers take the last value per step. Lines are written with a single
O_APPEND write each, so concurrent readers never see half a line except possibly the last one, which they skip.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

FINAL_EVENTS = ("done", "failed", "cancelled")


class EventLog:
    """Appends events to a job's events.jsonl."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, event: str, *, sync: bool = False, **fields: Any) -> dict:
        """Append one event (fields must be JSON-able); `sync` fsyncs (used for final events)."""
        record = {"event": event, "time": round(time.time(), 3), **fields}
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # a torn last line (a writer killed mid-write): end it, or this event would be glued onto it and lost
                line = b"\n" + line
            os.write(fd, line)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return record


def read_events(path: Path, *, offset: int = 0) -> tuple[list[dict], int]:
    """Events from byte `offset` on, and the offset after the last complete line (for following a log).

    Malformed lines (a torn last line, or garbage) are skipped.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # only complete lines
    events = []
    for raw in data[:end].splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            events.append(record)
    return events, offset + end


def last_final(events: list[dict]) -> dict | None:
    """The final event (done / failed / cancelled) of the latest attempt, or None while it has none."""
    for record in reversed(events):
        if record["event"] in FINAL_EVENTS:
            return record
        if record["event"] in ("start", "launch"):  # a newer attempt began after it
            return None
    return None


def last_step(events: list[dict]) -> int:
    """Finished steps according to the latest event that carries a step (0 when none)."""
    for record in reversed(events):
        if isinstance(record.get("step"), int):
            return record["step"]
    return 0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def describe_event(e: dict, steps: int | None = None) -> str:
    """One human-readable line for an event (the CLI's `jobs logs` and the TUI's log view)."""
    kind = e.get("event")
    of = f"/{steps}" if steps else ""
    if kind == "step":
        losses = dict(e.get("losses", {}))
        total = losses.pop("total", None)
        terms = " ".join(f"{k} {v:.4g}" for k, v in sorted(losses.items()))
        tps = e.get("tokens_per_s")
        return (f"step {e['step']}{of}  loss {total:.4g} ({terms})  lr {e.get('lr', 0):.2e}  "
                f"{tps:,.0f} tok/s  eta {_duration(e.get('eta_s'))}" if tps is not None and total is not None
                else f"step {e['step']}{of}  {terms}")
    if kind == "eval":
        return f"eval at step {e.get('step')}: perplexity {e.get('perplexity', float('nan')):.4g} " \
               f"({e.get('targets', '?')} tokens)"
    if kind == "checkpoint":
        return f"checkpoint at step {e.get('step')}: {e.get('path')}"
    if kind == "checkpoint_failed":
        return f"checkpoint at step {e.get('step')} FAILED: {e.get('error')}"
    if kind == "launch":
        return f"launched pid {e.get('pid')} (attempt {e.get('attempt') or '-'}, {e.get('nproc', 1)} process(es))"
    if kind == "status":
        return str(e.get("message", ""))
    if kind == "start":
        src = f" from {e['resumed_from']}" if e.get("resumed_from") else ""
        return f"started at step {e.get('step')}{src} on {e.get('device')} ({e.get('world_size', 1)} process(es))"
    if kind == "done":
        return f"done at step {e.get('step')}: model in {e.get('output')}"
    if kind == "failed":
        return f"FAILED at step {e.get('step')}: {e.get('error')}"
    if kind == "cancelled":
        return f"cancelled at step {e.get('step')} (checkpoint {e.get('checkpoint') or 'none'})"
    return json.dumps(e, sort_keys=True)
