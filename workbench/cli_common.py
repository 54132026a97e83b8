"""Shared pieces of the CLI: option aliases, consoles, progress, JSON output, options shared by several commands
(`shared_options`) and the evaluation settings of `workbench eval` / `compare` (`eval_settings`)."""

from __future__ import annotations

import inspect
import json
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from surgery.errors import UserError

if TYPE_CHECKING:
    from surgery.metrics.records import RecordStore
    from surgery.metrics.runner import EvalSettings

out = Console(soft_wrap=True)  # results (stdout)
err = Console(stderr=True, soft_wrap=True)  # progress and messages (stderr)

ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="Model source: HF directory, hub id, .gguf file or smollm2-135m.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout, nothing else.")]
AllowPickleOpt = Annotated[
    bool, typer.Option("--allow-pickle", help="Accept pickled .bin/.pt weights (read with weights_only=True).")
]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run model code shipped with a hub repo (off by default).")
]


def shared_options(options: dict[str, tuple[Any, Any]]) -> Callable[[Callable], Callable]:
    """Give several typer commands the same options without repeating them in each signature.

    The decorated command declares its own arguments and options plus a keyword-only `options: dict`; the options
    named here (name -> (Annotated type, default)) are inserted into its signature after its arguments, and it
    receives their values together as `options`.
    """

    def decorate(command: Callable) -> Callable:
        sig = inspect.signature(command, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "options"]
        args = [p for p in own if p.default is inspect.Parameter.empty]
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.default is not inspect.Parameter.empty]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                 for name, (annotation, default) in options.items()]

        def wrapper(*a, **kwargs):
            shared = {name: kwargs.pop(name) for name in options}
            return command(*a, **kwargs, options=shared)

        wrapper.__name__, wrapper.__qualname__ = command.__name__, command.__qualname__
        wrapper.__doc__, wrapper.__module__ = command.__doc__, command.__module__
        wrapper.__signature__ = sig.replace(parameters=[*args, *added, *rest])
        return wrapper

    return decorate


def eval_settings(options: dict) -> tuple[EvalSettings, RecordStore]:
    """EvalSettings and the records store from the options `workbench eval` and `compare` share.

    The option names are EvalSettings' field names (but `tokens` = max_tokens); `lm_eval` comes as "a,b",
    `threads` is applied to torch at once, `records` names the store's directory.

    Raises:
        UserError: Bad --lm-eval tasks or --threads.
    """
    import dataclasses

    from surgery.metrics.lm_eval_tasks import parse_tasks
    from surgery.metrics.records import RecordStore
    from surgery.metrics.runner import EvalSettings

    fields = {f.name for f in dataclasses.fields(EvalSettings)}
    kw = {("max_tokens" if k == "tokens" else k): v for k, v in options.items()}
    kw = {k: v for k, v in kw.items() if k in fields}
    kw["lm_eval"] = parse_tasks(kw.get("lm_eval"))
    settings = EvalSettings(**kw)
    set_threads(options.get("threads"))
    return settings, RecordStore(options.get("records"))


def set_threads(threads: int | None) -> None:
    """Apply --threads before any model runs (speed records key on the thread count)."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def print_json(data: Any) -> None:
    """One JSON document on stdout (sorted keys, so output diffs cleanly)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


NOTE_AFTER_S = 3.0  # off a terminal, a step running longer than this gets its line


class LateNotes:
    """Off a terminal (logs, CI): one line on stderr for a step still running after `after` seconds, so a long
    download or conversion is never silent while quick steps print nothing. Call with each step's message."""

    def __init__(self, after: float | None = None) -> None:
        self.after = NOTE_AFTER_S if after is None else after
        self._timer: threading.Timer | None = None

    def __call__(self, message: str) -> None:
        self.close()
        self._timer = threading.Timer(self.after, lambda: err.print(f"{message}…", markup=False, highlight=False))
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@contextmanager
def status(enabled: bool):
    """Progress of the library's long steps on stderr: on a terminal a spinner with the step and its elapsed
    time; elsewhere a one-line note for each step that runs longer than a few seconds; nothing when disabled."""
    if not enabled:
        yield lambda message: None
        return
    if not err.is_terminal:
        notes = LateNotes()
        try:
            yield notes
        finally:
            notes.close()
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True) as bar:
        task = bar.add_task("starting", total=None)
        yield lambda message: bar.reset(task, description=message)  # the elapsed time is the step's


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
