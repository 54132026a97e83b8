"""The experts of one MoE layer, coloured by an expert metric (router frequency, REAP); space marks one.

A marked expert reads `×e3` (struck through): the glyph says it without colour, as in the head grid.
"""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

from workbench.plots import heat_bucket

PER_ROW = 8  # at most; fewer when the cells would not fit the width (14 columns a cell with scores, 6 without)


class ExpertGrid(Widget, can_focus=True):
    """Experts in rows of up to eight; the focused one's value and the router's top-k under the grid."""

    DEFAULT_CSS = """
    ExpertGrid { height: auto; min-height: 3; padding: 0 1; border: round $panel; }
    ExpertGrid:focus { border: round $primary; }
    """
    BINDINGS = [
        Binding("left", "move(-1)", "prev expert", show=False, id="experts.left"),
        Binding("right", "move(1)", "next expert", show=False, id="experts.right"),
        Binding("up", "move_row(-1)", "row up", show=False, id="experts.up"),
        Binding("down", "move_row(1)", "row down", show=False, id="experts.down"),
        Binding("space", "toggle", "expert", id="experts.toggle"),
    ]

    cursor = reactive(0)

    class Toggle(Message):
        def __init__(self, expert: int) -> None:
            super().__init__()
            self.expert = expert

    def __init__(self, experts: int, top_k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.experts, self.top_k = experts, top_k
        self.scores: list[float] | None = None
        self.metric = ""
        self.marked: set[int] = set()

    def update_state(self, scores: list[float] | None, metric: str, marked: set[int]) -> None:
        self.scores, self.metric, self.marked = scores, metric, set(marked)
        self.refresh(layout=True)

    def per_row(self, width: int | None = None) -> int:
        cell = 14 if self.scores else 6
        return max(1, min(PER_ROW, (width if width is not None else self.content_size.width or 80) // cell))

    def get_content_height(self, container, viewport, width: int) -> int:
        return -(-self.experts // self.per_row(width)) + 1  # the rows, then the focused expert

    def render(self) -> Text:
        styles = self.app.theme_variables if self.app else {}
        heat = [styles.get(k, "") for k in ("heat-low", "heat-mid", "heat-high")]
        marked_colour = styles.get("marked", "red")
        values = self.scores or []
        lo, hi = (min(values), max(values)) if values else (0.0, 0.0)
        text = Text()
        per_row = self.per_row()
        for e in range(self.experts):
            glyph = "×" if e in self.marked else " "
            label = f"{glyph}e{e:<3}" + (f"{values[e]:>8.2e}" if values else "")
            style = f"on {heat[heat_bucket(values[e], lo, hi)]}" if values and heat[0] else ""
            if e in self.marked:
                style = f"strike {marked_colour}"
            if e == self.cursor and self.has_focus:
                style += " reverse"
            text.append(label + " ", style=style.strip())
            if e % per_row == per_row - 1 or e == self.experts - 1:
                text.append("\n")
        value = f"{values[self.cursor]:.4g}" if values else "no scores"
        text.append(f"expert {self.cursor}: {self.metric or 'metric'} = {value} · {self.experts - len(self.marked)} "
                    f"of {self.experts} kept (router top-k {self.top_k})", style="italic")
        return text

    def action_move(self, step: int) -> None:
        self.cursor = (self.cursor + step) % self.experts
        self.refresh()

    def action_move_row(self, step: int) -> None:
        self.action_move(step * self.per_row())

    def action_toggle(self) -> None:
        self.post_message(self.Toggle(self.cursor))
