"""A small modal form: one row per field (label beside its input), a button; Enter or the button submits, Esc
cancels. Sized for 80x24: at most 80 columns wide, scrolling when the terminal is shorter than the form."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label


class FormScreen(ModalScreen[dict | None]):
    """Returns {field: text} on submit, None on Esc. Subclasses set TITLE_TEXT, FIELDS and BUTTON."""

    DEFAULT_CSS = """
    FormScreen { align: center middle; }
    FormScreen > VerticalScroll { width: 100%; max-width: 80; height: auto; max-height: 100%;
                                  border: round $primary; background: $surface; padding: 0 1; }
    FormScreen Horizontal { height: auto; }
    FormScreen Horizontal > Label { width: 16; padding: 1 1 0 0; }
    FormScreen Horizontal > Input { width: 1fr; }
    """
    BINDINGS = [Binding("escape", "cancel", "cancel", id="form.cancel")]
    TITLE_TEXT = ""
    FIELDS: tuple[tuple[str, str], ...] = ()
    BUTTON = "ok"

    def __init__(self, defaults: dict[str, str]) -> None:
        super().__init__()
        self.defaults = defaults

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Label(self.TITLE_TEXT)
            for key, label in self.FIELDS:
                with Horizontal():
                    yield Label(label)
                    yield Input(value=self.defaults.get(key, ""), id=f"field-{key}")
            yield Button(self.BUTTON, variant="primary", id="submit")

    def values(self) -> dict[str, str]:
        return {key: self.query_one(f"#field-{key}", Input).value.strip() for key, _ in self.FIELDS}

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.values())

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(self.values())

    def action_cancel(self) -> None:
        self.dismiss(None)
