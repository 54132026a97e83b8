"""The jobs panel: every job in the jobs root (started here, by the CLI, or before the TUI opened), its live loss
curve from the event log (or, for a job without losses such as a compress recipe, its latest progress lines),
cancel, and small forms that start a distill / redistill job or the whole `workbench compress` recipe.

Jobs are separate processes (surgery.jobs): this screen only reads their files and writes request files, so
quitting the TUI never stops a job.
"""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from workbench.plots import plotext_chart
from workbench.screens.form import FormScreen

COLUMNS = ("job", "state", "step", "loss", "tokens/s", "eta", "eval")


def loss_series(events: list[dict]) -> dict[str, list[float]]:
    """Per-term loss curves from the step events' `losses` (pure: tested without a screen)."""
    series: dict[str, list[float]] = {}
    for e in events:
        if e.get("event") == "step":
            for key, value in (e.get("losses") or {}).items():
                if isinstance(value, (int, float)):
                    series.setdefault(key, []).append(float(value))
    return series


class NewJobScreen(FormScreen):
    """teacher, student, data, losses, steps -> a job document (validated by the caller)."""

    TITLE_TEXT = "[b]Start a distillation job[/b] (in the background; survives quitting)"
    FIELDS = (("teacher", "Teacher"), ("student", "Student"), ("data", "Training text"), ("losses", "Losses"),
              ("steps", "Steps"))
    BUTTON = "start"


class CompressFormScreen(FormScreen):
    """The `workbench compress` recipe as a background job: score, suggest, cut (+ reconstruct), redistill, eval."""

    TITLE_TEXT = ("[b]Compress: the whole recipe[/b] (score, plan, cut + reconstruct, redistill, evaluate; in the "
                  "background, survives quitting)")
    FIELDS = (("source", "Model"), ("target_params", "Keep params"), ("data", "Training text"),
              ("tokens", "Redistill tokens"), ("out", "Output dir"), ("eval_data", "Eval text"),
              ("options", "More options"))
    BUTTON = "start"


def progress_lines(events: list[dict], count: int = 8) -> str:
    """The latest progress of a job that logs no losses (a compress recipe): its status and phase lines."""
    from surgery.jobs.events import describe_event

    shown = [describe_event(e) for e in events if e.get("event") in ("status", "failed", "done", "cancelled")]
    return "\n".join(shown[-count:])


class JobsScreen(Screen):
    """Jobs table + the selected job's loss curve, refreshed from the event logs every 2 s."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "back", id="jobs.back"),
        Binding("n", "new_job", "new distill job", id="jobs.new"),
        Binding("r", "new_compress", "compress recipe", id="jobs.compress"),
        Binding("x", "cancel_job", "cancel job", id="jobs.cancel"),  # `c` is compare everywhere
        Binding("l", "load_compress_plan", "load its plan", id="jobs.load_plan"),
    ]

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.ids: list[str] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"jobs in {self.root}", id="jobs-root")
        yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
        yield Static(id="curve")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "jobs"
        table = self.query_one("#jobs", DataTable)
        for name in COLUMNS:
            table.add_column(name, key=name)
        self.poll()
        self.set_interval(2.0, self.poll)

    @work(thread=True, exclusive=True, group="jobs-poll", exit_on_error=False, description="reading job logs")
    def poll(self) -> None:
        from sessions.runs import read_compress_run
        from surgery.jobs.events import read_events
        from surgery.jobs.status import job_status
        from surgery.jobs.store import list_jobs

        rows = []
        for job in list_jobs(self.root):
            events, _ = read_events(job.path / "events.jsonl")
            st = job_status(job, events)
            # a compress recipe: its stages' metrics and plan, read here (off the UI thread), with the state above
            run = read_compress_run(job.path, st.state) if job.id.startswith("compress-") else None
            rows.append((st, events, run))
        self.app.call_from_thread(self.show, rows)

    def show(self, rows: list) -> None:
        table = self.query_one("#jobs", DataTable)
        cursor = table.cursor_row
        table.clear()
        self.ids = []
        for st, _, _ in rows:
            loss = st.losses.get("total") if st.losses else None
            table.add_row(
                st.id, st.state, f"{st.step}/{st.steps or '?'}", f"{loss:.4g}" if loss is not None else "",
                f"{st.tokens_per_s:.0f}" if st.tokens_per_s else "", f"{st.eta_s:.0f}s" if st.eta_s else "",
                ", ".join(f"{k} {v:.4g}" for k, v in (st.eval or {}).items() if isinstance(v, (int, float))),
            )
            self.ids.append(st.id)
        if rows:
            table.move_cursor(row=min(cursor or 0, len(rows) - 1))
            _, events, run = rows[table.cursor_row]
            series = loss_series(events)
            width = max(40, (self.size.width or 80) - 4)
            self.query_one("#curve", Static).update(
                plotext_chart(series, width, 12, title=f"job {self.ids[table.cursor_row]} losses")
                if series else "\n".join([*(run.lines() if run else []), progress_lines(events)]).strip()
                or "no steps logged yet"
            )
        else:
            self.query_one("#curve", Static).update("no jobs yet: n starts one")

    def action_cancel_job(self) -> None:
        from surgery.jobs.runner import request_cancel
        from surgery.jobs.store import find_job

        table = self.query_one("#jobs", DataTable)
        if not self.ids:
            return
        job_id = self.ids[table.cursor_row]
        self.app.notify(request_cancel(find_job(self.root, job_id)), title=f"job {job_id}")

    def action_load_compress_plan(self) -> None:
        """The selected compress run's plan as the marks (one undoable edit, as opening a plan file)."""
        from sessions.runs import read_compress_run

        table = self.query_one("#jobs", DataTable)
        job_id = self.ids[table.cursor_row] if self.ids else ""
        run = read_compress_run(self.root / job_id) if job_id.startswith("compress-") else None
        if run is None or run.plan is None:
            self.app.notify("select a compress job that has suggested its plan", title="jobs", severity="warning")
            return
        self.app.open_plan_file(run.plan)

    def action_new_job(self) -> None:
        from surgery.data import shared_data_file  # torch: imported only when needed

        app = self.app
        defaults = {
            "teacher": app.source,
            "student": getattr(app, "last_export", "") or "",
            "data": shared_data_file("tinyshakespeare/input.txt"),
            "losses": "kl:1.0,ce:0.1",
            "steps": "100",
        }
        self.app.push_screen(NewJobScreen(defaults), self.start_job)

    def action_new_compress(self) -> None:
        import time

        from surgery.data import shared_data_file

        app = self.app
        session = getattr(app, "session", None)
        out = (str(session.path / "exports" / f"compressed-{time.strftime('%Y%m%d-%H%M%S')}") if session is not None
               else "exports/compressed")
        defaults = {"source": app.source, "target_params": "0.8", "data": shared_data_file("tinyshakespeare/input.txt"),
                    "tokens": "25600", "out": out, "eval_data": shared_data_file("wikitext-2-raw/wiki.test.raw"),
                    "options": "eval_tokens=4096"}
        self.app.push_screen(CompressFormScreen(defaults), self.start_compress)

    def start_compress(self, fields: dict | None) -> None:
        from workbench.compress_job import start_compress

        self._start(start_compress, fields, "compress job")

    def start_job(self, fields: dict | None) -> None:
        self._start(start_distill, fields, "job")

    def _start(self, starter, fields: dict | None, what: str) -> None:
        if not fields:
            return
        try:
            job_id = starter(self.root, fields)
        except Exception as exc:  # noqa: BLE001 - bad form input is shown, never a crash
            self.app.notify(str(exc).splitlines()[0], title=f"{what} not started", severity="error", timeout=10)
            return
        self.app.notify(f"started {what} {job_id}", title="jobs")
        self.poll()


def start_distill(root: Path, fields: dict) -> str:
    """Validate the form like `workbench distill` does, create the job and start its process; returns its id."""
    from surgery.distill.config import parse_config, parse_losses
    from surgery.distill.prepare import check_job
    from surgery.jobs.runner import start_job
    from surgery.jobs.store import create_job

    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value

    doc = {"version": 1, "kind": "distill", "teacher": absolute(fields["teacher"]),
           "student": absolute(fields["student"]), "data": absolute(fields["data"]),
           "losses": parse_losses(fields["losses"]), "steps": int(fields["steps"])}
    cfg = parse_config(doc, "job form")
    check_job(cfg)
    job = create_job(root, cfg.to_json())
    start_job(job)
    return job.id
