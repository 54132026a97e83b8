"""The Textual workbench: open a model, see it layer by layer, mark, plan, apply - keyboard first, over SSH.

Nothing heavy runs on the UI thread: resolving/inspecting the source, loading weights, estimating totals and applying
run in thread workers whose results come back as Messages (workbench/messages.py). One `Worker.StateChanged`
handler turns worker failures into notifications.
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Callable, Iterable

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from surgery.errors import PlanError, UserError
from themes import DEFAULT_THEME, THEMES
from workbench.editor import PlanEditor
from workbench.messages import EstimateReady, MarksChanged, ModelInspected, ScoresReady, StatusText, WeightsLoaded
from workbench.screens.help import HelpScreen, binding_rows
from workbench.screens.layer import LayerScreen
from workbench.screens.model import ModelScreen
from workbench.screens.plan import PlanScreen
from workbench.screens.prompt import PromptScreen
from workbench.scores_view import (CHANNEL_METRICS, EXPERT_METRICS, HEAD_METRICS, LAYER_METRICS, NEURON_METRICS,
                                   ScoreView)


def phase_progress(current: dict, done: int, total: int, now: float | None = None) -> str:
    """"singular values: 40/210 matrices · 2.1/s · ETA 1:21" for the status line (rate over the whole phase)."""
    elapsed = (time.perf_counter() if now is None else now) - current["start"]
    text = f"{current['name']}: {done:,}/{total:,} {current['unit']}"
    if done and elapsed > 0:
        rate = done / elapsed
        left = int((total - done) / rate)
        text += f" · {rate:,.3g}/s · ETA {left // 60}:{left % 60:02d}"
    return text


METRIC_KINDS = (("head", HEAD_METRICS), ("neuron", NEURON_METRICS), ("layer", LAYER_METRICS),
                ("channel", CHANNEL_METRICS), ("expert", EXPERT_METRICS))


class WorkbenchApp(App):
    """The workbench. `source` is anything `surgery.sources.resolve_source` accepts."""

    TITLE = "workbench"
    CSS_PATH = "app.tcss"
    BINDINGS = [
        # footer order = priority: at 80 columns the first ones are what fits after the screen's own keys
        Binding("q", "quit", "quit", id="app.quit"),
        Binding("question_mark", "help", "help", id="app.help"),
        Binding("u,ctrl+z", "undo", "undo", id="app.undo"),
        Binding("U,ctrl+y", "redo", "redo", id="app.redo"),
        Binding("p", "plan", "plan", id="app.plan"),
        Binding("s", "score", "score", id="app.score"),
        Binding("c", "compare", "compare", id="app.compare"),
        Binding("j", "jobs", "jobs", id="app.jobs"),
        Binding("L", "mark_lowest", "lowest %", id="app.mark_lowest"),
        Binding("t", "next_metric", "metric", id="app.next_metric"),
        Binding("ctrl+c", "cancel_scoring", "cancel scoring", show=False, id="app.cancel_scoring"),
        Binding("o", "load_scores", "load scores", show=False, id="app.load_scores"),
        Binding("w", "save_plan", "save plan", show=False, id="app.save_plan"),
    ]

    def __init__(self, source: str, *, scores: str | None = None, load_weights: bool = True,
                 on_plan_commit: Callable | None = None, initial_plan=None, session=None) -> None:
        super().__init__()
        self.source = source
        self.session = session  # a sessions.Session (open, writable or read-only) or None
        self.scores_path = scores
        self.load_weights = load_weights
        self.on_plan_commit = on_plan_commit
        self.initial_plan = initial_plan
        self.report = None
        self.config_dict: dict = {}
        self.model_path: str = ""
        self.editor: PlanEditor | None = None
        self.scores: ScoreView | None = None
        self.loaded = None
        self.metrics = {"head": None, "neuron": None, "layer": None, "channel": None, "expert": None}
        self.applying = False
        self.last_export = ""
        self.revision = 0  # bumped by every accepted change; estimates carry the revision they were made for
        self.shown_revision = -1
        self._weights_started = False
        self._model_ref = None  # surgery.plan.ModelRef, from model_ref()
        self.started = time.perf_counter()
        self.first_paint: float | None = None

    # ------------------------------------------------------------------------------------------- start-up
    def on_mount(self) -> None:
        for theme in THEMES:
            self.register_theme(theme)
        remembered = self.session.ui.theme if self.session is not None else None
        self.theme = remembered if remembered in {t.name for t in THEMES} else DEFAULT_THEME
        self.sub_title = self.source + (f" · session {self.session.name}" if self.session is not None else "")
        if self.session is not None:
            for notice in self.session.notices:
                self.notify(notice, title="session", severity="warning", timeout=10)
        self.push_screen(ModelScreen())
        self.inspect_source()

    @work(thread=True, exclusive=True, group="inspect", exit_on_error=False, description="reading model headers")
    def inspect_source(self) -> None:
        from surgery.inspect import inspect_model
        from surgery.sources import read_config_file, resolve_source  # no torch: the table must come at once

        self.post_message(StatusText("model", "resolving"))
        resolved = resolve_source(self.source)
        report = inspect_model(resolved.path)
        self.post_message(ModelInspected(report, read_config_file(resolved.path), str(resolved.path)))

    def on_model_inspected(self, message: ModelInspected) -> None:
        from surgery.shapes import shape_from_config

        self.report, self.config_dict, self.model_path = message.report, message.config, message.path
        self.editor = PlanEditor(shape_from_config(message.config), self.initial_plan, on_commit=self._committed,
                                 session=self.session)
        for notice in self.editor.notices:
            self.notify(notice, title="session", severity="warning", timeout=10)
        self.set_status("model", "")
        self.totals.source = self.source
        self.refresh_views()
        self.first_paint = time.perf_counter() - self.started
        self.estimate_totals()
        self.fingerprint_source()
        if self.scores_path:
            self.read_scores(self.scores_path)
        elif self.session is not None:
            self.reuse_session_scores()

    @work(thread=True, exclusive=True, group="fingerprint", exit_on_error=False, description="fingerprinting")
    def fingerprint_source(self) -> None:
        self.model_ref()
        self.call_from_thread(setattr, self.totals, "fingerprint", self._model_ref.fingerprint)

    def model_ref(self):
        """The model a saved plan names: the opened source as `describe_source` records it (absolute paths, the
        .gguf itself for GGUF sources), so its fingerprint is the one the CLI computes. Blocks on the first call
        (fingerprinting is cached by path, size and mtime): call it from a worker."""
        from sessions.check import describe_source
        from surgery.plan import ModelRef

        if self._model_ref is None:
            model = describe_source(self.source)
            self._model_ref = ModelRef(source=model.source, fingerprint=model.fingerprint)
        return self._model_ref

    def plan_for_file(self):
        """The plan under edit as a file that replays alone (`workbench plan validate/apply FILE`): model source,
        fingerprint and provenance, like a plan from `plan suggest`."""
        provenance = {"tool": "workbench TUI"}
        if self.session is not None:
            provenance.update(session=self.session.name, journal_seq=self.session.seq)
        if self.scores is not None and self.scores.source:
            provenance["scores"] = self.scores.source
        return self.editor.plan().model_copy(update={"model": self.model_ref(), "provenance": provenance})

    @work(thread=True, exclusive=True, group="weights", exit_on_error=False, description="loading weights")
    def load_model_weights(self) -> None:
        from surgery.loading import load_model

        self.post_message(StatusText("weights", "loading…"))
        self.post_message(WeightsLoaded(load_model(self.model_path)))

    def on_weights_loaded(self, message: WeightsLoaded) -> None:
        self.loaded = message.loaded
        self.set_status("weights", "ready")

    # -------------------------------------------------------------------------------------------- editing
    @property
    def totals(self):
        from workbench.widgets.totals import TotalsBar

        return self.screen_stack[1].query_one(TotalsBar) if len(self.screen_stack) > 1 else TotalsBar()

    def set_status(self, key: str, text: str) -> None:
        if len(self.screen_stack) > 1:
            self.totals.set_status(key, text)

    def on_status_text(self, message: StatusText) -> None:
        self.set_status(message.key, message.text)

    def edit(self, change: Callable[[PlanEditor], object]) -> bool:
        """Run one editor change; an illegal mark is refused on the spot with the resolver's reason."""
        if self.editor is None:
            self.notify("the model is still opening", severity="warning")
            return False
        try:
            change(self.editor)
        except PlanError as exc:
            self.notify(exc.problems[0].split(": ", 1)[-1], title="refused", severity="error", timeout=6)
            return False
        except UserError as exc:  # e.g. a read-only session, a full disk: nothing changed
            self.notify(str(exc), title="not saved", severity="error", timeout=8)
            return False
        return True

    def _committed(self, description: str, plan) -> None:
        self.revision += 1
        if self.on_plan_commit:
            self.on_plan_commit(description, plan)
        self.post_message(MarksChanged(description))

    def on_marks_changed(self, message: MarksChanged) -> None:
        self.refresh_views()
        self.set_status("totals", "updating…")
        self.estimate_totals()

    @work(thread=True, exclusive=True, group="estimate", exit_on_error=False, description="estimating totals")
    def estimate_totals(self) -> None:
        from textual.worker import get_current_worker

        from surgery.estimate import estimate

        revision, resolution = self.revision, self.editor.resolution
        # from the safetensors headers where they cover the model (no meta-device build per edit: a 70B one in ~1 s)
        result = estimate(self.config_dict, resolution, source_dir=self.model_path or None)
        if not get_current_worker().is_cancelled:
            self.post_message(EstimateReady(result, revision))

    def on_estimate_ready(self, message: EstimateReady) -> None:
        # workers may finish out of order (they queue on the model-build lock): never show an older estimate
        if message.revision >= self.shown_revision and len(self.screen_stack) > 1:
            self.shown_revision = message.revision
            self.totals.estimate = message.estimate
            self.set_status("totals", "" if message.revision == self.revision else "updating…")
            if self.screen_stack[1].is_mounted:  # the model screen: its params column follows the estimate
                self.screen_stack[1].refresh_table()
        if self.load_weights and self.loaded is None and not self._weights_started:
            # after the first totals: a weight load holds the model-build lock for seconds
            self._weights_started = True
            self.load_model_weights()

    def refresh_views(self) -> None:
        for screen in self.screen_stack:
            refresh = getattr(screen, "refresh_table", None) or getattr(screen, "refresh_view", None)
            if refresh and screen.is_mounted:
                refresh()

    # -------------------------------------------------------------------------------------------- scores
    @work(thread=True, exclusive=True, group="scores", exit_on_error=False, description="reading scores")
    def read_scores(self, path: str) -> None:
        self.post_message(ScoresReady(ScoreView.from_file(path, self.editor.shape.spec)))
        if self.session is not None and not self.session.readonly:
            self.keep_scores_in_session(Path(path))

    def keep_scores_in_session(self, path: Path) -> None:
        """Copy a loaded score file into the session's scores/ (atomically), so reopening the session shows it;
        only a score file of these weights, which is what `reuse_session_scores` picks up."""
        from sessions.fsio import atomic_write_bytes
        from surgery.importance import ScoreMismatch, load_scores

        folder = self.session.path / "scores"
        if path.resolve().parent == folder.resolve():
            return
        try:
            load_scores(path, model_fingerprint=self.session.model.fingerprint)
        except (ScoreMismatch, UserError) as exc:
            self.call_from_thread(self.notify, f"not kept in the session: {exc}", title="scores", severity="warning")
            return
        atomic_write_bytes(folder / f"loaded-{time.strftime('%Y%m%d-%H%M%S')}-{path.name}", path.read_bytes())

    def on_scores_ready(self, message: ScoresReady) -> None:
        self.scores = message.scores
        for kind, candidates in METRIC_KINDS:
            self.metrics[kind] = self.scores.first_available(candidates)
        self.notify(f"scores: {', '.join(self.scores.metrics())}")
        self.refresh_views()

    @work(thread=True, exclusive=True, group="scores", exit_on_error=False, description="reading cached scores")
    def reuse_session_scores(self) -> None:
        """The session's newest score file for these weights (scores are cached per session)."""
        from surgery.importance import ScoreMismatch, load_scores

        files = sorted((self.session.path / "scores").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        for path in reversed(files):
            try:
                scores = load_scores(path, model_fingerprint=self.session.model.fingerprint)
            except (ScoreMismatch, UserError):
                continue
            self.post_message(ScoresReady(ScoreView.from_tensors(scores.tensors, self.editor.shape.spec, str(path))))
            return

    def action_score(self) -> None:
        from surgery.data import shared_data_file
        from workbench.screens.score import DEFAULT_METHODS, ScoreFormScreen

        if self.editor is None:
            return
        data = shared_data_file("wikitext-2-raw/wiki.test.raw")
        defaults = {"data": data, "tokens": "4096", "seq_len": "256", "methods": DEFAULT_METHODS}
        self.push_screen(ScoreFormScreen(defaults), self._start_scoring)

    def _start_scoring(self, fields: dict | None) -> None:
        if fields:
            self.run_scoring(fields)

    @work(thread=True, exclusive=True, group="score", exit_on_error=False, description="scoring")
    def run_scoring(self, fields: dict) -> None:
        from textual.worker import get_current_worker

        from surgery.importance import Cancelled, save_scores, score_source

        worker = get_current_worker()
        current = {"name": "passes", "unit": "tokens", "start": time.perf_counter()}

        def phase(name: str, total: int, unit: str) -> None:
            current.update(name=name, unit=unit, start=time.perf_counter())
            self.post_message(StatusText("scoring", f"{name}: 0/{total:,} {unit} (ctrl+c cancels)"))

        def progress(done: int, total: int) -> None:
            self.post_message(StatusText("scoring", phase_progress(current, done, total) + " (ctrl+c cancels)"))

        try:
            # the source as named (not its resolved cache path): the score file records the fingerprint the CLI
            # records, the .gguf's for a GGUF source, so the session's own check accepts it
            scores = score_source(self.source, fields["data"] or None, fields["methods"],
                                  tokens=int(fields["tokens"]), seq_len=int(fields["seq_len"]),
                                  progress=progress, cancel=worker.cancelled_event, phase=phase)
        except Cancelled:
            self.post_message(StatusText("scoring", "cancelled"))
            return
        except ValueError as exc:
            raise UserError(f"score form: {exc}") from None
        finally:
            self.post_message(StatusText("scoring", ""))
        where = ""
        if self.session is not None and not self.session.readonly:
            path = self.session.path / "scores" / f"scores-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
            save_scores(path, scores)
            where = str(path)
        self.post_message(ScoresReady(ScoreView.from_tensors(scores.tensors, self.editor.shape.spec, where)))

    def action_cancel_scoring(self) -> None:
        self.workers.cancel_group(self, "score")

    def action_width_scores(self) -> None:
        """Channel norms (and, on MoE models, router frequency and REAP per expert) computed here, when the
        score file lacks them: a form for the calibration text, then a worker."""
        from surgery.data import shared_data_file
        from workbench.screens.score import WidthScoreFormScreen

        if self.editor is None:
            return
        defaults = {"data": shared_data_file("wikitext-2-raw/wiki.test.raw"), "tokens": "4096", "seq_len": "256"}
        self.push_screen(WidthScoreFormScreen(defaults), lambda fields: fields and self.run_width_scores(fields))

    @work(thread=True, exclusive=True, group="score", exit_on_error=False, description="channel / expert scores")
    def run_width_scores(self, fields: dict) -> None:
        from textual.worker import get_current_worker

        from surgery.importance import Cancelled
        from workbench.scores_view import width_score_tensors

        self.post_message(StatusText("scoring", "channel / expert scores: loading…"))
        try:
            tensors = width_score_tensors(self.source, fields["data"], int(fields["tokens"]), int(fields["seq_len"]),
                                          loaded=self.loaded, cancel=get_current_worker().cancelled_event)
        except Cancelled:
            return
        except ValueError as exc:
            raise UserError(f"score form: {exc}") from None
        finally:
            self.post_message(StatusText("scoring", ""))
        base = self.scores or ScoreView({}, self.editor.shape.spec, "")
        self.post_message(ScoresReady(base.merged(tensors)))

    def metric_for(self, kind: str) -> str | None:
        return self.metrics.get(kind)

    def layer_importance(self) -> list[float]:
        metric = self.metrics.get("layer")
        return (self.scores.layer(metric) or []) if self.scores and metric else []

    def linear_names(self) -> list[str]:
        spec = self.editor.shape.spec
        return [f"{spec.attn}.{n}" for n in spec.attn_linears] + [f"{spec.mlp}.{n}" for n in spec.mlp_linears]

    # ------------------------------------------------------------------------------------------- actions
    def open_layer(self, layer: int) -> None:
        if self.editor is not None and 0 <= layer < len(self.editor.layers):
            self.push_screen(LayerScreen(layer))

    def action_help(self) -> None:
        sections = {"everywhere": binding_rows(self.BINDINGS)}
        screen = self.screen
        if not isinstance(screen, HelpScreen):
            sections[type(screen).__name__.replace("Screen", " screen")] = binding_rows(screen.BINDINGS)
            for widget in screen.query("*"):
                rows = binding_rows(getattr(widget, "BINDINGS", []))
                if rows and type(widget).__module__.startswith("workbench"):
                    sections[type(widget).__name__] = rows
        self.push_screen(HelpScreen(sections))

    def action_plan(self) -> None:
        if self.editor is not None and not isinstance(self.screen, PlanScreen):
            self.push_screen(PlanScreen())

    def jobs_root(self):
        """The session's jobs/ when a session is open, else the user's jobs root (surgery.jobs.store)."""
        from surgery.jobs.store import jobs_root

        return jobs_root(self.session.path / "jobs" if self.session is not None else None)

    def action_width(self) -> None:
        from workbench.screens.width import WidthScreen

        if self.editor is not None and not isinstance(self.screen, WidthScreen):
            self.push_screen(WidthScreen())

    def action_jobs(self) -> None:
        from workbench.screens.jobs import JobsScreen

        if not isinstance(self.screen, JobsScreen):
            self.push_screen(JobsScreen(self.jobs_root()))

    def compare_sources(self) -> list[str]:
        """The original, the plan's latest output, and every finished job's output (newest last)."""
        from surgery.jobs.status import job_status
        from surgery.jobs.store import list_jobs

        sources = [self.source]  # as the user named it: a short column name, not the cache path it resolves to
        if self.last_export:
            sources.append(self.last_export)
        for job in list_jobs(self.jobs_root()):
            st = job_status(job)
            if st.state == "done" and st.output and Path(st.output).is_dir() and st.output not in sources:
                sources.append(st.output)
        return sources

    def action_compare(self) -> None:
        from surgery.data import shared_data_file
        from workbench.screens.compare import CompareScreen

        if self.editor is None or isinstance(self.screen, CompareScreen):
            return
        records = self.session.path / "evals" if self.session is not None else None
        data = shared_data_file("wikitext-2-raw/wiki.test.raw") or None
        self.push_screen(CompareScreen(self.compare_sources(), data, records))

    def action_undo(self) -> None:
        if self.editor is not None and not self.editor.undo():
            self.notify("nothing to undo")

    def action_redo(self) -> None:
        if self.editor is not None and not self.editor.redo():
            self.notify("nothing to redo")

    def action_next_metric(self) -> None:
        if not self.scores:
            self.notify("no scores loaded (o: load a score file)", severity="warning")
            return
        have = self.scores.metrics()
        for kind, candidates in METRIC_KINDS:
            options = [m for m in candidates if m in have]
            if options and self.metrics[kind] in options:
                self.metrics[kind] = options[(options.index(self.metrics[kind]) + 1) % len(options)]
        self.notify(", ".join(f"{kind}s {m}" for kind, m in self.metrics.items() if m and kind != "layer"),
                    title="metric")
        self.refresh_views()

    def action_load_scores(self) -> None:
        def done(path: str | None) -> None:
            if path:
                self.read_scores(path)

        self.push_screen(PromptScreen("Score file (safetensors):", self.scores_path or "scores.safetensors"), done)

    def action_save_plan(self) -> None:
        def done(path: str | None) -> None:
            if path:
                self.save_plan_file(path)

        self.push_screen(PromptScreen("Save plan as:", "plan.json"), done)

    @work(thread=True, exclusive=True, group="save", exit_on_error=False, description="saving the plan")
    def save_plan_file(self, path: str) -> None:
        plan = self.plan_for_file()
        try:
            plan.save(path)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.call_from_thread(self.notify, f"saved {len(plan.steps)} op(s) to {path} (replays with: workbench apply "
                                           f"{path} --out DIR)")

    def action_open_plan(self) -> None:
        def done(path: str | None) -> None:
            if path:
                self.open_plan_file(path)

        self.push_screen(PromptScreen("Open plan file (its ops replace the marks; one undo takes it back):",
                                      "plan.json"), done)

    def open_plan_file(self, path: str) -> bool:
        """Load a plan file's ops as the marks: one undoable edit (refused, nothing changed, if it does not fit)."""
        from surgery.plan import load_plan

        try:
            plan = load_plan(path)
        except UserError as exc:
            self.notify(str(exc), title="plan", severity="error", timeout=8)
            return False
        known = self._model_ref.fingerprint if self._model_ref is not None else None
        if plan.model and plan.model.fingerprint and known and plan.model.fingerprint != known:
            self.notify(f"{path} was made for other weights ({plan.model.source})", title="plan", severity="warning")
        if self.edit(lambda e: e.set_plan(plan, f"open plan {path}")):
            self.notify(f"{len(plan.steps)} op(s) from {path} (u undoes)", title="plan")
            return True
        return False

    def action_validate_plan(self) -> None:
        res = self.editor.resolution
        text = "valid" + (f"; warnings: {'; '.join(res.warnings)}" if res.warnings else "")
        self.notify(text, title="plan", severity="warning" if res.warnings else "information")

    def action_apply_plan(self) -> None:
        def done(out: str | None) -> None:
            if out:
                self.run_apply(out)

        default = "exports/pruned"
        if self.session is not None:
            default = str(self.session.path / "exports" / time.strftime("%Y%m%d-%H%M%S"))
        self.push_screen(PromptScreen("Apply the plan into directory:", default), done)

    @work(thread=True, exclusive=True, group="apply", exit_on_error=False, description="applying plan")
    def run_apply(self, out: str) -> None:
        from surgery.pipeline import apply_to_source

        self.applying = True
        try:
            self.post_message(StatusText("apply", "running…"))
            result = apply_to_source(self.plan_for_file(), out, overwrite=False)  # the CLI's source + fingerprint
            self.last_export = str(result.out)  # the jobs form offers it as the student
            loader = result.manifest["output"]["loadable_with"]
            self.call_from_thread(self.notify, f"wrote {out} (loads with {loader})", title="apply")
        finally:
            self.applying = False
            self.post_message(StatusText("apply", ""))

    def action_reconstruct(self) -> None:
        """A form for the reconstruction step (the fields of `plan suggest --reconstruct`), then a worker."""
        from surgery.data import shared_data_file
        from workbench.screens.plan import ReconstructFormScreen

        if self.editor is None:
            return
        previous = self.editor.data_steps.get("calibration")
        step = self.editor.data_steps.get("reconstruct")
        defaults = {"data": previous.source if previous else shared_data_file("wikitext-2-raw/wiki.test.raw"),
                    "tokens": str(previous.tokens if previous else 8192),
                    "seq_len": str(previous.seq_len if previous else 256),
                    "ridge": str(step.ridge if step else 0.1), "inputs": step.inputs if step else "original"}
        self.push_screen(ReconstructFormScreen(defaults), lambda fields: fields and self.run_reconstruct(fields))

    @work(thread=True, exclusive=True, group="reconstruct", exit_on_error=False, description="reconstruct step")
    def run_reconstruct(self, fields: dict) -> None:
        """Tokenize the text and record it in the plan (calibration block + reconstruct step), as `plan suggest
        --reconstruct` does; applying the plan runs the refit."""
        from pydantic import ValidationError

        from surgery.plan import Reconstruct
        from surgery.reconstruct import calibrate_for_source

        try:
            options = {"tokens": int(fields["tokens"]), "seq_len": int(fields["seq_len"])}
            step = Reconstruct(op="reconstruct", inputs=fields["inputs"], ridge=float(fields["ridge"]))
        except (ValueError, ValidationError) as exc:
            first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            raise UserError(f"reconstruct form: {first}") from None
        if not fields["data"]:
            raise UserError("reconstruct form: the calibration text is needed")
        self.post_message(StatusText("reconstruct", "tokenizing calibration text…"))
        try:
            plan = calibrate_for_source(self.plan_for_file(), fields["data"], reconstruct=step, **options)
        finally:
            self.post_message(StatusText("reconstruct", ""))

        def take() -> None:
            if self.edit(lambda e: e.set_reconstruct(plan, f"reconstruct on {plan.calibration.tokens} tokens")):
                self.notify(f"reconstruct step added: {plan.calibration.tokens:,} tokens of {fields['data']}, "
                            f"ridge {step.ridge}, inputs {step.inputs} (A applies it)", title="plan")

        self.call_from_thread(take)

    def action_mark_lowest(self) -> None:
        def done(answer: str | None) -> None:
            if not answer:
                return
            try:
                kind, pct = answer.split()
                self.mark_lowest(kind, float(pct.rstrip("%")) / 100)
            except ValueError:
                self.notify("answer like: heads 25%  |  groups 33%  |  neurons 20%  |  channels 10%  |  experts 25%",
                            severity="error")

        self.push_screen(PromptScreen("Mark lowest (heads|groups|neurons|channels|experts PERCENT), every layer:",
                                      "neurons 20%"), done)

    def mark_lowest(self, kind: str, fraction: float) -> None:
        """Mark the lowest `fraction` of heads / KV groups / neurons in every layer by the current metric (or of
        the residual channels, or of every MoE layer's experts)."""
        from workbench.plots import lowest

        if kind == "experts":
            n = max((e for e in self.editor.shape.experts), default=0)
            self.mark_lowest_experts(round(n * fraction)) if n else self.notify("this model has no experts")
            return
        if kind == "channels":
            scores = self.scores.channel(self.metrics["channel"]) if self.scores and self.metrics["channel"] else None
            if not scores:
                self.notify("no channel scores: C in the width view computes them", severity="warning")
                return
            count = round(self.editor.shape.hidden * fraction)
            self.edit(lambda e: e.set_hidden(lowest(scores, count), f"mark lowest {count} channels"))
            return

        metric = self.metrics["neuron" if kind == "neurons" else "head"]
        if not self.scores or not metric:
            self.notify("no scores for that: load or compute scores first", severity="warning")
            return
        steps = [s.model_dump() for s in self.editor.plan().steps if s.op not in {
            "neurons": ("prune_neurons",), "heads": ("prune_heads",), "groups": ("prune_heads",)}.get(kind, ())]
        for i, s in enumerate(self.editor.shape.layers):
            if kind == "neurons" and s.mlp:
                chosen = lowest(self.scores.neuron(i, metric) or [], round(s.mlp * fraction))
                if chosen:
                    steps.append({"op": "prune_neurons", "layer": i, "neurons": chosen})
            elif kind in ("heads", "groups") and s.heads:
                per_group = self.scores.head(i, metric) or []
                g = s.group_size
                if kind == "groups":
                    sums = [sum(per_group[k * g:(k + 1) * g]) for k in range(s.kv_heads)]
                    groups = lowest(sums, round(s.kv_heads * fraction))
                    heads = [h for k in groups for h in range(k * g, (k + 1) * g)]
                else:  # the same number from every group keeps the GQA rule
                    n = round(g * fraction)
                    heads = [k * g + j for k in range(s.kv_heads)
                             for j in lowest(per_group[k * g:(k + 1) * g], n)]
                if heads:
                    steps.append({"op": "prune_heads", "layer": i, "heads": sorted(heads)})
        self.edit(lambda e: e.set_plan(e.plan_with_steps(steps), f"mark lowest {kind}"))

    def mark_lowest_experts(self, count: int) -> bool:
        """Remove the `count` lowest-scored experts (current expert metric) of every MoE layer: one undoable edit
        (refused with the resolver's reason, e.g. below the router's top-k)."""
        from workbench.plots import lowest

        metric = self.metrics["expert"]
        if not self.scores or not metric:
            self.notify("no expert scores: C (width view or layer screen) computes them, or load a score file",
                        severity="warning")
            return False
        steps = [s.model_dump(exclude_none=True) for s in self.editor.plan().steps if s.op != "prune_experts"]
        for i, n in enumerate(self.editor.shape.experts):
            scores = self.scores.expert(i, metric) if n else None
            if scores and count > 0 and not self.editor.layers[i].dropped:
                steps.append({"op": "prune_experts", "layer": i, "experts": lowest(scores, count)})
        return self.edit(lambda e: e.set_plan(e.plan_with_steps(steps), f"lowest {count} experts of every MoE layer"))

    def set_theme(self, name: str) -> None:
        self.theme = name
        if self.session is not None and not self.session.readonly:
            self.session.set_theme(name)  # remembered in the session
        self.refresh_views()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("plan: Show", "the ops of the plan under edit", self.action_plan)
        yield SystemCommand("plan: Validate", "check the plan against the model", self.action_validate_plan)
        yield SystemCommand("plan: Save as...", "write the plan file", self.action_save_plan)
        yield SystemCommand("plan: Open file...", "a plan file's ops as marks (one undoable edit)",
                            self.action_open_plan)
        yield SystemCommand("plan: Apply", "write the pruned model", self.action_apply_plan)
        yield SystemCommand("plan: Add reconstruction step...", "refit the cut layers on calibration text (training-"
                            "free)", self.action_reconstruct)
        yield SystemCommand("plan: Width view", "residual channels by score, the prune_hidden cut", self.action_width)
        yield SystemCommand("jobs: Show", "distill / redistill / compress jobs and their progress", self.action_jobs)
        yield SystemCommand("compare: Models", "original vs the plan's output vs job outputs", self.action_compare)
        yield SystemCommand("marks: Undo", "undo the last mark", self.action_undo)
        yield SystemCommand("marks: Redo", "redo", self.action_redo)
        yield SystemCommand("marks: Mark lowest N%", "heads / groups / neurons by the metric", self.action_mark_lowest)
        yield SystemCommand("scores: Compute", "score heads, neurons, layers, spectra on text", self.action_score)
        yield SystemCommand("scores: Load file", "a score file from `workbench score`", self.action_load_scores)
        yield SystemCommand("scores: Channels and experts (here)", "channel_norm; expert_freq / expert_reap on MoE "
                            "models, when the score file lacks them", self.action_width_scores)
        yield SystemCommand("scores: Next metric", "cycle the importance metric", self.action_next_metric)
        for theme in THEMES:
            yield SystemCommand(f"theme: {theme.name}", "switch theme", lambda n=theme.name: self.set_theme(n))

    # ------------------------------------------------------------------------------------------- errors
    @on(Worker.StateChanged)
    def worker_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            severity = "error"
            message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            self.notify(message, title=event.worker.description or "error", severity=severity, timeout=10)
            if event.worker.group == "weights":
                self.set_status("weights", "failed")

    async def action_quit(self) -> None:
        if not self.applying:
            self.exit()
            return

        def done(answer: str | None) -> None:
            if answer and answer.lower().startswith("y"):
                self.exit()

        self.push_screen(PromptScreen("An apply is running; quit anyway? (y/n)", "n"), done)
