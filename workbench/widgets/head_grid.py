"""Query heads grouped by KV group, coloured by an importance metric; space marks a head, g a whole group."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

from workbench.plots import heat_bucket


class HeadGrid(Widget, can_focus=True):
    """Rows are KV groups, cells are query heads. A marked head reads `×h3` (struck through, `marked` colour), a
    pending one (picked, not GQA-legal yet) `?h3` (underlined): the glyph says it without colour."""

    DEFAULT_CSS = """
    HeadGrid { height: auto; min-height: 3; padding: 0 1; border: round $panel; }
    HeadGrid:focus { border: round $primary; }
    """
    BINDINGS = [
        Binding("left", "move(-1)", "prev head", show=False, id="grid.left"),
        Binding("right", "move(1)", "next head", show=False, id="grid.right"),
        Binding("up", "move_group(-1)", "prev group", show=False, id="grid.up"),
        Binding("down", "move_group(1)", "next group", show=False, id="grid.down"),
        Binding("space", "toggle_head", "head", id="grid.toggle_head"),
        Binding("g", "toggle_group", "KV group", id="grid.toggle_group"),
    ]

    cursor = reactive(0)

    class Toggle(Message):
        def __init__(self, head: int | None, group: int | None) -> None:
            super().__init__()
            self.head, self.group = head, group

    def __init__(self, heads: int, kv_heads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.heads, self.kv_heads = heads, kv_heads
        self.scores: list[float] | None = None
        self.metric = ""
        self.marked: set[int] = set()
        self.pending: set[int] | None = None  # the pending selection replaces the marks while there is one

    @property
    def group_size(self) -> int:
        return max(1, self.heads // max(1, self.kv_heads))

    def update_state(self, scores: list[float] | None, metric: str, marked: set[int],
                     pending: set[int] | None = None) -> None:
        self.scores, self.metric, self.marked = scores, metric, set(marked)
        self.pending = set(pending) if pending else None
        self.refresh(layout=True)

    def get_content_height(self, container, viewport, width: int) -> int:
        return self.kv_heads + 1

    def render(self) -> Text:
        styles = self.app.theme_variables if self.app else {}
        low, mid, high = (styles.get(k, "") for k in ("heat-low", "heat-mid", "heat-high"))
        marked_colour = styles.get("marked", "red")
        values = self.scores or []
        lo, hi = (min(values), max(values)) if values else (0.0, 0.0)
        text = Text()
        for g in range(self.kv_heads):
            text.append(f"KV {g:>2} ", style="dim")
            for h in range(g * self.group_size, (g + 1) * self.group_size):
                shown = self.pending if self.pending is not None else self.marked
                glyph = ("?" if self.pending is not None else "×") if h in shown else " "
                label = f"{glyph}h{h:<2}"
                if values:
                    label = f"{glyph}h{h:<2}{values[h]:>8.2e}"
                bg = (low, mid, high)[heat_bucket(values[h], lo, hi)] if values else ""
                style = f"on {bg}" if bg else ""
                if h in shown:
                    style = f"underline {marked_colour}" if self.pending is not None else f"strike {marked_colour}"
                if h == self.cursor and self.has_focus:
                    style += " reverse"
                text.append(label + " ", style=style.strip())
            text.append("\n")
        value = f"{values[self.cursor]:.4g}" if values else "no scores"
        text.append(f"head {self.cursor} (group {self.cursor // self.group_size}): {self.metric or 'metric'} = {value}",
                    style="italic")
        return text

    def action_move(self, step: int) -> None:
        self.cursor = (self.cursor + step) % self.heads
        self.refresh()

    def action_move_group(self, step: int) -> None:
        self.cursor = (self.cursor + step * self.group_size) % self.heads
        self.refresh()

    def action_toggle_head(self) -> None:
        self.post_message(self.Toggle(self.cursor, None))

    def action_toggle_group(self) -> None:
        self.post_message(self.Toggle(None, self.cursor // self.group_size))
