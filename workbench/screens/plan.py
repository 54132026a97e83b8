"""The plan panel: the ops of the plan under edit, each removable; validate, save, apply."""

from __future__ import annotations

import json

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Label, ListItem, ListView, Static


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


class PlanScreen(Screen):
    """Every op of the plan; Delete removes one (an undoable change)."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "back", id="plan.back"),
        Binding("delete,backspace,d", "remove", "remove op", id="plan.remove"),
        Binding("v", "app.validate_plan", "validate", id="plan.validate"),
        Binding("w", "app.save_plan", "save as", id="plan.save"),
        Binding("A", "app.apply_plan", "apply", id="plan.apply"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="plan-summary")
        yield ListView(id="ops")
        yield Footer()

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
            + "\n[dim]d: remove · v: validate · w: save as · A: apply[/dim]"
        )

    def action_remove(self) -> None:
        ops = self.query_one("#ops", ListView)
        if ops.index is None:
            return
        plan = self.app.editor.plan()
        steps = [s.model_dump() for i, s in enumerate(plan.steps) if i != ops.index]
        from surgery.plan import parse_plan

        new = parse_plan(json.loads(json.dumps({"version": 1, "steps": steps})))
        self.app.edit(lambda e: e.set_plan(new, f"remove op {ops.index}"))
