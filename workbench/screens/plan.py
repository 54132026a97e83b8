"""The plan panel: the ops of the plan under edit, each removable; validate, save, apply, export; and which runtimes
its output will run on (plain transformers, llama.cpp, vLLM, surgery.load) with the padding each would need."""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Label, ListItem, ListView, Static

from workbench.screens.form import FormScreen


def describe_step(step) -> str:
    """One line per op, e.g. "prune_heads  layer 4: heads 0, 3, 6"."""
    data = step.model_dump(exclude={"op"})
    parts = []
    for key, value in sorted(data.items()):
        if isinstance(value, list) and len(value) > 12:
            value = f"{len(value)} ({', '.join(map(str, value[:6]))}, …)"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        parts.append(f"{key} {value}")
    return f"{step.op:<16} " + " · ".join(parts)


def runtimes_text(resolution, config_dict: dict) -> str:
    """One line per runtime for the plan's output, e.g. "vllm: runs with padding (+12,288 params, 2 change(s))"."""
    from surgery.export.runtimes import runtime_fits, shape_after

    fits = runtime_fits(shape_after(resolution), config_dict or None)
    return "runs on: " + " · ".join(
        (f"[green]{f.runtime}[/]" if f.runs and not f.adjustments else
         f"[yellow]{f.runtime}[/] (+{f.params_added:,} params padding)" if f.runs else
         f"[dim]{f.runtime}: no[/]") for f in fits)


class ReconstructFormScreen(FormScreen):
    """The fields `plan suggest --reconstruct` takes: data, tokens, seq-len, ridge, inputs."""

    TITLE_TEXT = ("[b]Add a reconstruction step[/b] (refit o_proj / down_proj of every cut layer on this text when "
                  "the plan is applied; tokenized now, in the background)")
    FIELDS = (("data", "Calibration text"), ("tokens", "Tokens"), ("seq_len", "Sequence length"),
              ("ridge", "Ridge"), ("inputs", "Inputs"))
    BUTTON = "add step"


class PlanScreen(Screen):
    """Every op of the plan; Delete removes one (an undoable change)."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "back", id="plan.back"),
        Binding("delete,backspace,d", "remove", "remove op", id="plan.remove"),
        Binding("v", "app.validate_plan", "validate", id="plan.validate"),
        Binding("w", "app.save_plan", "save as", id="plan.save"),
        Binding("A", "app.apply_plan", "apply", id="plan.apply"),
        Binding("x", "export", "export", id="plan.export"),
        Binding("r", "app.reconstruct", "reconstruct", id="plan.reconstruct"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="plan-summary")
        yield Static("[dim]runtimes: checking…[/dim]", id="plan-runtimes")
        yield ListView(id="ops")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "plan"
        self.refresh_view()

    def refresh_view(self) -> None:
        plan = self.app.editor.plan()
        ops = self.query_one("#ops", ListView)
        index = ops.index
        ops.clear()
        for step in plan.steps:
            ops.append(ListItem(Label(describe_step(step))))
        if plan.steps:
            ops.index = min(index or 0, len(plan.steps) - 1)
        warnings = self.app.editor.resolution.warnings
        self.query_one("#plan-summary", Static).update(
            f"{len(plan.steps)} op(s)" + (f" · {len(warnings)} warning(s): " + "; ".join(warnings) if warnings else "")
            + "\n[dim]d: remove · v: validate · w: save as · A: apply · x: export (gguf|vllm) · r: add a "
            "reconstruction step[/dim]"
        )
        self.check_runtimes(self.app.editor.resolution, dict(self.app.config_dict))

    @work(thread=True, exclusive=True, group="runtimes", exit_on_error=False, description="checking runtimes")
    def check_runtimes(self, resolution, config_dict: dict) -> None:
        # a thread: surgery.export imports torch (seconds on first use), never on the UI thread
        text = runtimes_text(resolution, config_dict)
        self.app.call_from_thread(self.query_one("#plan-runtimes", Static).update, text)

    def action_export(self) -> None:
        def done(answer: str | None) -> None:
            if not answer:
                return
            target, _, out = answer.strip().partition(" ")
            if target not in ("gguf", "vllm") or not out.strip():
                self.notify("answer like: vllm exports/pruned-vllm  |  gguf exports/pruned.gguf", severity="error")
                return
            self.run_export(target, out.strip())

        from workbench.screens.prompt import PromptScreen

        self.app.push_screen(PromptScreen("Export the plan's output (gguf|vllm PATH):", "vllm exports/pruned-vllm"),
                             done)

    @work(thread=True, exclusive=True, group="export", exit_on_error=False, description="exporting")
    def run_export(self, target: str, out: str) -> None:
        """Apply the plan under edit into a temporary directory, then export that (the plan as it is now)."""
        import tempfile

        from surgery.pipeline import apply_to_source

        with tempfile.TemporaryDirectory(prefix="workbench-export-") as tmp:
            self.app.call_from_thread(self.notify, f"applying the plan, then exporting to {target}…", title="export")
            applied = apply_to_source(self.app.plan_for_file(), str(Path(tmp) / "applied"), overwrite=False)
            if target == "gguf":
                from surgery.export.gguf import export_gguf as exporter
            else:
                from surgery.export.vllm import export_vllm as exporter
            report = exporter(str(applied.out), out)
        padded = f", padding +{report.params_added:,} params" if report.adjustments else ", no padding"
        self.app.call_from_thread(self.notify, f"wrote {report.out}{padded}; serve: {report.serve_command}",
                                  title="export", timeout=15)

    def action_remove(self) -> None:
        ops = self.query_one("#ops", ListView)
        if ops.index is None:
            return
        editor = self.app.editor
        steps = [s.model_dump(exclude_none=True) for i, s in enumerate(editor.plan().steps) if i != ops.index]
        self.app.edit(lambda e: e.set_plan(editor.plan_with_steps(steps), f"remove op {ops.index}"))
