"""`workbench eval SOURCE`: size, perplexity, agreement with a teacher, speed, samples, lm-eval tasks for one model.

Also holds what `workbench compare` shares with it: the option aliases, the progress bar and the table renderer.
The work itself is `surgery.metrics.runner`; records are reused from --records DIR when nothing changed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from workbench.cli_common import (AllowPickleOpt, JsonOpt, TrustRemoteCodeOpt, err, eval_settings, out, print_json,
                                  shared_options)

if TYPE_CHECKING:
    from rich.table import Table

    from surgery.metrics.table import Comparison

_DATA = "Data and teacher"
_SPEED = "Speed"
DataOpt = Annotated[str | None, typer.Option(
    "--data", help="Text for perplexity/agreement: .txt, .jsonl, .parquet or hf:NAME[:CONFIG[:SPLIT]].",
    rich_help_panel=_DATA)]
TextFieldOpt = Annotated[str | None, typer.Option(
    "--text-field", help="Field/column holding the text in .jsonl/.parquet data.", rich_help_panel=_DATA)]
SeqLenOpt = Annotated[int | None, typer.Option(
    "--seq-len", help="Tokens per block/window (default 2048, or the model's limit when smaller).",
    rich_help_panel=_DATA)]
StrideOpt = Annotated[int | None, typer.Option(
    "--stride", help="Sliding windows with this stride (only new tokens scored); default: non-overlapping blocks.",
    rich_help_panel=_DATA)]
TokensOpt = Annotated[int | None, typer.Option(
    "--tokens", help="Use only the first N tokens of the data (whole blocks).", rich_help_panel=_DATA)]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Blocks per forward pass.", rich_help_panel=_DATA)]
TeacherOpt = Annotated[str | None, typer.Option(
    "--teacher", help="Teacher model: KL(teacher||model), top-1 agreement, top-k overlap on the data.",
    rich_help_panel=_DATA)]
TopKOpt = Annotated[int, typer.Option("--top-k", help="k of the top-k overlap.", rich_help_panel=_DATA)]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16, float16 or auto (the checkpoint's).")]
SpeedOpt = Annotated[bool, typer.Option(
    "--speed/--no-speed", help="Measure prefill latency, decode tokens/s and peak memory.", rich_help_panel=_SPEED)]
PromptLenOpt = Annotated[int | None, typer.Option(
    "--prompt-len", help="Prompt tokens for the prefill latency (default 128, or half the model's context).",
    rich_help_panel=_SPEED)]
NewTokensOpt = Annotated[int, typer.Option(
    "--new-tokens", help="Decode steps per speed run.", rich_help_panel=_SPEED)]
SpeedBatchOpt = Annotated[int, typer.Option(
    "--speed-batch", help="Batch B of the batched decode figure.", rich_help_panel=_SPEED)]
RepeatsOpt = Annotated[int, typer.Option(
    "--repeats", help="Timed runs per speed figure (median and spread shown).", rich_help_panel=_SPEED)]
WarmupOpt = Annotated[int, typer.Option(
    "--warmup", help="Untimed runs before each speed figure.", rich_help_panel=_SPEED)]
GenerateOpt = Annotated[int, typer.Option(
    "--generate", help="Greedy samples for the first N built-in prompts (0: none).")]
GenTokensOpt = Annotated[int, typer.Option("--gen-tokens", help="New tokens per generation sample.")]
LmEvalOpt = Annotated[str | None, typer.Option(
    "--lm-eval", help="lm-eval tasks, comma-separated (needs the lm-eval package).")]
LmEvalLimitOpt = Annotated[int | None, typer.Option("--lm-eval-limit", help="Examples per lm-eval task.")]
RecordsOpt = Annotated[Path | None, typer.Option(
    "--records", help="Records directory (default: $WORKBENCH_RECORDS or the user data dir's evals/).")]
FreshOpt = Annotated[bool, typer.Option("--fresh", help="Recompute even when a matching record exists.")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", help="torch CPU threads (default: torch's choice; fewer is steadier on a shared machine).")]
_REC = "Recommendation"
RecDataOpt = Annotated[str | None, typer.Option(
    "--rec-data", help="Prepared rec data (`workbench rec prepare`): HR/NDCG/MRR rows for rec model directories.",
    rich_help_panel=_REC)]
RecMaxUsersOpt = Annotated[int | None, typer.Option(
    "--rec-max-users", help="Score only the first N test users of --rec-data (default: all).", rich_help_panel=_REC)]

# The options `workbench eval` and `workbench compare` share (name -> (type, default)), in --help order; both
# commands receive them as one dict and turn it into EvalSettings with `cli_common.eval_settings`.
EVAL_OPTIONS = {
    "data": (DataOpt, None), "seq_len": (SeqLenOpt, None), "stride": (StrideOpt, None), "tokens": (TokensOpt, None),
    "batch_size": (BatchOpt, 1), "teacher": (TeacherOpt, None), "top_k": (TopKOpt, 5),
    "device": (DeviceOpt, "cpu"), "dtype": (DtypeOpt, "auto"), "speed": (SpeedOpt, True),
    "prompt_len": (PromptLenOpt, None), "new_tokens": (NewTokensOpt, 16), "speed_batch": (SpeedBatchOpt, 4),
    "repeats": (RepeatsOpt, 3), "warmup": (WarmupOpt, 1), "generate": (GenerateOpt, 0),
    "gen_tokens": (GenTokensOpt, 32), "lm_eval": (LmEvalOpt, None), "lm_eval_limit": (LmEvalLimitOpt, None),
    "text_field": (TextFieldOpt, None), "rec_data": (RecDataOpt, None), "rec_max_users": (RecMaxUsersOpt, None),
    "records": (RecordsOpt, None), "fresh": (FreshOpt, False), "threads": (ThreadsOpt, None),
    "allow_pickle": (AllowPickleOpt, False), "trust_remote_code": (TrustRemoteCodeOpt, False),
}


@contextmanager
def progress_bar() -> Iterator:
    """A rich progress display on stderr fed by the library's ProgressEvents; a no-op off a terminal."""
    if not err.is_terminal:
        yield None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        current: dict[str, tuple[str, int]] = {}  # model -> (task name, rich task id): one line per model

        def on_event(ev) -> None:
            desc = f"{ev.model} · {ev.message or ev.task}"
            task = current.get(ev.model)
            if task is None or task[0] != ev.task:
                if task is not None:
                    bar.update(task[1], visible=False)
                current[ev.model] = task = (ev.task, bar.add_task(desc, total=ev.total))
            bar.update(task[1], completed=ev.done, total=ev.total, description=desc)

        yield on_event


_VERDICT_STYLE = {"better": "green", "worse": "red", "same": "dim"}


def render_table(comp: Comparison, title: str) -> Table:
    """The comparison as a rich Table: deltas coloured green (better) / red (worse) / dim (within noise)."""
    from rich.table import Table
    from rich.text import Text

    from surgery.metrics.table import MARK_DATA, format_delta

    reused = sum(c.reused for r in comp.rows for c in r.cells)
    total = sum(c.value is not None for r in comp.rows for c in r.cells)
    caption = f"{reused} of {total} values from stored records (--fresh recomputes)" if reused else None
    table = Table(title=title, caption=caption, show_lines=False)
    table.add_column("metric", no_wrap=False)
    for label in comp.columns:
        table.add_column(label, justify="right")
    kind = None
    for row in comp.rows:
        if kind is not None and row.kind != kind:
            table.add_section()
        kind = row.kind
        cells = []
        for i, cell in enumerate(row.cells):
            text = Text(cell.text, justify="left" if row.unit == "text" else "right",
                        style="yellow" if cell.mark == "skipped" else "")
            if cell.mark == MARK_DATA:
                text.append(f" {MARK_DATA}", style="yellow")
            if i > 0 and cell.delta is not None:
                text.append(f" ({format_delta(cell.delta)})", style=_VERDICT_STYLE.get(cell.verdict or "", ""))
            cells.append(text)
        table.add_row(Text(row.label), *cells)
    return table


def print_notes(comp: Comparison) -> None:
    """The table's notes (marks, skipped metrics) under it on stdout."""
    for note in comp.notes:
        out.print(note, markup=False, highlight=False)


def fail_on_skipped(evals) -> None:
    """One 'error:' line per skipped metric on stderr, then exit code 2 (the rest was still printed)."""
    lines = [f"error: {e.label}: {reason}" for e in evals for reason in e.skipped.values()]
    if lines:
        for line in dict.fromkeys(lines):
            print(line, file=sys.stderr)
        raise typer.Exit(2)


@shared_options(EVAL_OPTIONS)
def evaluate(
    source: Annotated[str, typer.Argument(help="Model: HF directory, hub id, .gguf file, smollm2-135m or a rec "
                                               "model directory.")],
    json_out: JsonOpt = False,
    *,
    options: dict,
) -> None:
    """Measure one model: size, perplexity, agreement, speed, generation samples, lm-eval tasks, rec metrics."""
    from surgery.metrics.runner import evaluate_source
    from surgery.metrics.table import build_comparison

    settings, store = eval_settings(options)
    with progress_bar() as progress:
        result = evaluate_source(source, settings, store=store, fresh=options["fresh"], progress=progress)
    if json_out:
        print_json({
            "model": result.model.model_dump(),
            "records": [r.model_dump(mode="json") for r in result.records],
            "reused": sorted(result.reused),
            "skipped": result.skipped,
            "records_dir": str(store.root),
        })
    else:
        comp = build_comparison([result])
        out.print(render_table(comp, f"eval · {source} · {result.model.fingerprint[:19]}…"))
        print_notes(comp)
    fail_on_skipped([result])
