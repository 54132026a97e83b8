"""`workbench open` and `workbench sessions list|show|export|replay|rm`: sessions on disk from the command line.

The sessions themselves live in the `sessions` package (no UI there); this module only parses options and prints.
`workbench open` creates or resumes the session and opens it in the TUI (without a terminal, or with --no-tui or
--json, it prints the session's summary instead).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from sessions import Session, check_name, default_name, describe_source, list_sessions, remove_session, sessions_root
from sessions.extras import PLAN_EXTRAS_KEY, split_plan
from surgery.errors import UserError
from surgery.plan import load_plan
from workbench.cli_common import (
    AllowPickleOpt,
    JsonOpt,
    ModelOpt,
    TrustRemoteCodeOpt,
    err,
    fmt_int,
    out,
    print_json,
    status,
)

app = typer.Typer(no_args_is_help=True, help="Sessions: list, show, export, replay, rm.")

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Workbench home; sessions live in HOME/sessions (default: $WORKBENCH_HOME, else the "
                                "user data directory)."),
]
NameArg = Annotated[str, typer.Argument(help="Session name.", show_default=False)]


def when(t: float | None) -> str:
    """Seconds since the epoch -> local 'YYYY-MM-DD HH:MM' ('-' when unknown)."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _warn(lines: list[str]) -> None:
    for line in lines:
        err.print(f"[yellow]warning:[/] {line}", markup=True, highlight=False)


def print_summary(summary: dict) -> None:
    """Human-readable session summary (what `open` and `show` print)."""
    m = summary["model"]
    marks = ", ".join(f"{k} {v}" for k, v in summary["marks"].items() if v) or "none"
    c = summary["contents"]
    jobs = ", ".join(f"{j['id']} ({j['status']})" for j in c["jobs"]) or "none"
    state = "read-only" if summary["readonly"] else "writable"
    lines = [
        f"session   {summary['name']}  ({summary['path']}, {state})",
        f"model     {m['source']}  {(m['fingerprint'] or '')[:19]}",
        f"changed   {when(summary['updated'])}  (journal seq {summary['journal_seq']}, created "
        f"{when(summary['created'])})",
        f"marks     {summary['mark_count']}: {marks}  -> {summary['plan_steps']} plan step(s)",
        f"history   {summary['undo_depth']} undo, {summary['redo_depth']} redo",
        f"scores    {len(c['scores'])} file(s)   evals {len(c['evals'])}   exports {len(c['exports'])}",
        f"jobs      {jobs}",
    ]
    for run in c.get("compress", []):  # the compress recipes run in this session (sessions.runs)
        from sessions.runs import CompressRun

        lines += ["compress  " + line for line in CompressRun(**run).lines()]
    if summary.get("locked_by"):
        lines.append(f"locked    by {summary['locked_by']}")
    for line in lines:
        out.print(line, markup=False, highlight=False)


def validate_plan_for(plan, model, plan_file: Path) -> None:
    """Every problem of `plan` against the model's config at once (PlanError), before the session is touched; a
    plan made for other weights is a warning (its indices may still fit)."""
    from surgery.resolve import resolve_plan
    from surgery.shapes import shape_from_config

    resolve_plan(plan, shape_from_config(model.config))
    if plan.model and plan.model.fingerprint and plan.model.fingerprint != model.fingerprint:
        _warn([f"{plan_file} was made for other weights ({plan.model.source}, {plan.model.fingerprint[:19]}...)"])


def open_session(
    source: Annotated[str, typer.Argument(help="Model source: HF directory, hub id, .gguf file or smollm2-135m.",
                                          show_default=False)],
    session: Annotated[str | None, typer.Option("--session", "-s", help="Session name (default: from SOURCE).")]
    = None,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
    no_tui: Annotated[bool, typer.Option("--no-tui", help="Only print the session's summary.")] = False,
    plan_file: Annotated[Path | None, typer.Option("--plan", help="Load this plan file's ops as the session's marks "
                                                                   "(one undoable edit), e.g. from `plan suggest`.")]
    = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Create or resume a session on a model and open it in the workbench TUI (a summary without a terminal)."""
    root = sessions_root(home)
    name = check_name(session) if session else default_name(source)  # a bad name fails before any model work
    plan = load_plan(plan_file) if plan_file is not None else None  # a bad plan file too
    with status(not json_out) as progress:
        model = describe_source(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                progress=progress)
    if plan is not None:
        validate_plan_for(plan, model, plan_file)
    s, created = Session.open_or_create(name, model, root=root)
    if plan is not None:
        try:
            # the journal holds marks; width/expert cuts, refits and calibration go to the UI state, as in the TUI
            marks, extras = split_plan(plan)
            s.load_plan(marks, note=f"plan file {plan_file}")
            s.set_ui(PLAN_EXTRAS_KEY, extras or None)
        except BaseException:
            s.close()
            raise
    if not (json_out or no_tui) and sys.stdout.isatty():
        from workbench.app import WorkbenchApp

        try:
            WorkbenchApp(source, session=s).run()
        finally:
            s.close()
        return
    try:
        check = None if created else s.check_model(model)
        if check is not None and check.same_weights is False and session is None:
            raise UserError(f"session {name!r} exists for other weights ({s.model.source}); pass --session NAME "
                            f"to start a new session, or --session {name} to open it against these weights")
        summary = s.summary()
        if check is not None:
            summary["model_check"] = {"same_weights": check.same_weights, "fingerprint": check.actual,
                                      "plan_fits": check.plan_fits, "problems": check.problems,
                                      "warnings": check.warnings}
    finally:
        s.close()
    if json_out:
        print_json({**summary, "created_now": created})
        return
    _warn(summary["notices"] + (check.messages() if check else []))
    out.print(f"{'created' if created else 'resumed'} session {name!r}", markup=False, highlight=False)
    print_summary(summary)
    err.print(f"open it in the TUI from a terminal: workbench open {source} --session {name}", markup=False,
              highlight=False)


@app.command("list")
def list_cmd(home: HomeOpt = None, json_out: JsonOpt = False) -> None:
    """List sessions: name, model, last change, marks, running jobs."""
    root = sessions_root(home)
    rows = list_sessions(root)
    if json_out:
        print_json({"root": str(root), "sessions": [r.to_dict() for r in rows]})
        return
    if not rows:
        out.print(f"no sessions in {root} (workbench open SOURCE --session NAME creates one)", markup=False,
                  highlight=False)
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col, justify in (("name", "left"), ("model", "left"), ("last change", "left"), ("marks", "right"),
                         ("running jobs", "right"), ("", "left")):
        # fold, never truncate: a model path cut with an ellipsis is a path nobody can use
        table.add_column(col, justify=justify, overflow="fold", no_wrap=col in ("last change", "marks"))
    for r in rows:
        note = f"error: {r.error}" if r.error else (f"open: {r.locked_by}" if r.locked_by else "")
        table.add_row(r.name, r.source or "?", when(r.updated), fmt_int(r.marks), str(r.running_jobs), note)
    out.print(table)


@app.command("show")
def show(name: NameArg, home: HomeOpt = None, json_out: JsonOpt = False) -> None:
    """Show one session: model, marks, history depth, scores, jobs, evaluations, exports."""
    s = Session.open(name, root=sessions_root(home), readonly=True)
    summary = s.summary()
    if json_out:
        print_json(summary)
        return
    _warn(summary["notices"])
    print_summary(summary)


@app.command("export")
def export(
    name: NameArg,
    plan_file: Annotated[Path, typer.Option("--plan", help="Plan file to write (JSON, atomically).")],
    home: HomeOpt = None,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Write the plan even if it does not validate "
                                                                    "against the session's model.")] = False,
) -> None:
    """Write the session's current plan as a plan file (for `workbench apply`)."""
    s = Session.open(name, root=sessions_root(home), readonly=True)
    plan = s.full_plan()
    if not no_validate and s.shape is not None:
        s.validate()  # PlanError: every problem, one line each, exit 2
    if plan_file.is_dir():
        raise UserError(f"{plan_file} is a directory: give a file name for the plan")
    try:
        plan.save(plan_file)
    except OSError as exc:
        raise UserError(f"cannot write {plan_file}: {exc.strerror or exc}") from None
    out.print(f"wrote {plan_file}: {len(plan.steps)} step(s) from session {name!r} (journal seq {s.seq})",
              markup=False, highlight=False)


@app.command("replay")
def replay(
    name: NameArg,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (default: the session's "
                                                                      "exports/<time>).")] = None,
    model: ModelOpt = None,
    home: HomeOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Apply even if the model has other weights.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")] = False,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (the checkpoint's).")] = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Apply the session's plan headlessly and write an HF-format directory (like `workbench apply`)."""
    s = Session.open(name, root=sessions_root(home), readonly=True)
    if not s.full_plan().steps:
        raise UserError(f"session {name!r} has no marks: nothing to apply")
    target = out_dir or s.path / "exports" / time.strftime("%Y%m%d-%H%M%S")
    start = time.perf_counter()
    with status(not json_out) as progress:
        result = s.apply(target, model=model, force=force, overwrite=overwrite, dtype=dtype, progress=progress)
    seconds = time.perf_counter() - start
    m = result.manifest
    if json_out:
        print_json({**m, "out": str(result.out), "session": name, "seconds": round(seconds, 3)})
        return
    _warn(result.validation.warnings)
    before, after = m["params"]["before"], m["params"]["after"]
    out.print(f"wrote {result.out}: params {fmt_int(before)} -> {fmt_int(after)} ({1 - after / before:.1%} removed) "
              f"from session {name!r} in {seconds:.1f}s; loadable with {m['output']['loadable_with']}",
              markup=False, highlight=False)


@app.command("rm")
def rm(
    name: NameArg,
    home: HomeOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Remove even if the session is open elsewhere or has "
                                                        "running jobs.")] = False,
) -> None:
    """Remove a session and everything inside its directory (never anything outside it)."""
    root = sessions_root(home)
    s = Session.open(name, root=root, readonly=True)  # unknown names fail here, with close matches
    c = s.contents()
    what = (f"session {name!r} at {s.path} ({s.mark_count} marks, {len(c.scores)} score files, {len(c.jobs)} jobs, "
            f"{len(c.evals)} evals, {len(c.exports)} exports)")
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"not removing {what} without confirmation: pass --yes")
        if not typer.confirm(f"remove {what}?", default=False):
            out.print("nothing removed", markup=False, highlight=False)
            return
    path = remove_session(name, root, force=force)
    out.print(f"removed {path}", markup=False, highlight=False)
