"""`?`: every binding of the app and of the screen underneath, with its description."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class HelpScreen(ModalScreen):
    """Lists bindings; any key closes it."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 80%; max-width: 90; height: 80%; border: round $primary; background: $surface; padding: 0 1; }
    """
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "close", id="help.close")]

    def __init__(self, sections: dict[str, list[tuple[str, str]]]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        lines = []
        for title, rows in self.sections.items():
            lines.append(f"[b]{title}[/b]")
            lines.extend(f"  [b]{key:<14}[/b] {desc}" for key, desc in rows)
            lines.append("")
        lines.append("[dim]Every action is also in the command palette (ctrl+p). Esc closes this.[/dim]")
        with VerticalScroll():
            yield Static("\n".join(lines))


def key_names(key: str) -> str:
    """"question_mark,ctrl+z" -> "?, ctrl+z": what a user types, not Textual's key names."""
    from textual.keys import format_key

    return ", ".join(format_key(k.strip()) for k in key.split(","))


def binding_rows(bindings) -> list[tuple[str, str]]:
    """(key, description) for bindings with a description, in declaration order."""
    rows = []
    for b in bindings:
        if isinstance(b, Binding) and b.description:
            rows.append((b.key_display or key_names(b.key), b.description))
    return rows
