"""The width view: residual-stream channels sorted by their score (lowest first, log10 axis), the cut marked; the
cut is the plan's one prune_hidden step (Minitron width pruning: the same channels in every layer, the embedding
and lm_head included).

Families whose config needs num_attention_heads to divide hidden_size (Llama): `+`/`-` move the cut by a multiple
of the head count, so every size they reach is legal; a count typed with `n` that is not is refused with the
resolver's reason, which names the nearest legal sizes.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from workbench.plots import log_curve, lowest, plotext_chart


def width_step(hidden: int, heads: int, needs_divisible: bool) -> int:
    """Channels one `+`/`-` press moves the cut: about 1/64 of the width, a multiple of `heads` when the family
    needs heads to divide the hidden size (pure: tested)."""
    step = max(1, round(hidden / 64))
    if needs_divisible and heads:
        step = heads * max(1, round(step / heads))
    return step


class WidthScreen(Screen):
    """Channel scores sorted with the cut; +/- move it, n sets it, x clears it, C computes channel scores."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "back", id="width.back"),
        Binding("plus,equals_sign", "cut(1)", "cut", key_display="+/-", id="width.cut_more"),
        Binding("minus", "cut(-1)", "cut less", show=False, id="width.cut_less"),
        Binding("n", "cut_count", "cut N", id="width.cut_count"),
        Binding("x", "clear", "no cut", id="width.clear"),
        Binding("C", "app.width_scores", "compute scores", id="width.compute"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll():
            yield Static(id="width-summary")
            yield Static(id="channels")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "width (residual channels)"
        self.refresh_view()

    def scores(self) -> list[float] | None:
        app = self.app
        metric = app.metric_for("channel")
        return app.scores.channel(metric) if app.scores and metric else None

    def refresh_view(self) -> None:
        app = self.app
        shape, editor = app.editor.shape, app.editor
        cut = len(editor.hidden)
        spec = shape.spec
        rule = (f"sizes must be multiples of {shape.base_heads} (num_attention_heads divides hidden_size)"
                if spec.hidden_divisible_by_heads else "any size")
        if not spec.hidden_prunable:
            rule = f"prune_hidden is not supported for {spec.family} models"
        self.query_one("#width-summary", Static).update(
            f"[b]hidden size[/b] {shape.hidden - cut}/{shape.hidden} · {cut} channel(s) cut · {rule}\n"
            "[dim]+/-: move the cut (lowest-scored first) · n: cut N · x: no cut · C: compute channel scores[/dim]")
        metric = app.metric_for("channel")
        scores = self.scores()
        if scores:
            ys, at = log_curve(scores, cut)
            width = max(40, (self.size.width or 80) - 4)
            text = plotext_chart({f"log10 |{metric}|, lowest first": ys}, width, 14,
                                 title=f"residual channels by {metric} (cut {cut})", vline=at)
        else:
            text = ("no channel scores: C computes channel_norm here on calibration text, or run `workbench score "
                    "--method channel-norm` and load the file with o")
        self.query_one("#channels", Static).update(text)

    def set_cut(self, count: int) -> None:
        scores = self.scores()
        if not scores:
            self.app.notify("no channel scores: C computes them (or load a score file with o)", severity="warning")
            return
        hidden = self.app.editor.shape.hidden
        count = max(0, min(hidden, count))
        self.app.edit(lambda e: e.set_hidden(lowest(scores, count), f"cut the {count} lowest residual channels"))

    def action_cut(self, direction: int) -> None:
        shape = self.app.editor.shape
        step = width_step(shape.hidden, shape.base_heads, shape.spec.hidden_divisible_by_heads)
        self.set_cut(max(0, min(shape.hidden - step, len(self.app.editor.hidden) + direction * step)))

    def action_cut_count(self) -> None:
        from workbench.screens.prompt import PromptScreen

        def done(answer: str | None) -> None:
            if not answer:
                return
            try:
                count = int(answer)
            except ValueError:
                self.app.notify("a whole number of channels, e.g. 64", severity="error")
                return
            self.set_cut(count)

        self.app.push_screen(PromptScreen("Cut the N lowest-scored residual channels (N):",
                                          str(len(self.app.editor.hidden) or "")), done)

    def action_clear(self) -> None:
        self.app.edit(lambda e: e.set_hidden([], "no width cut"))
