"""The score form: calibration data and methods; scoring runs in a worker with progress and can be cancelled.

Results are written into the session's scores/ (when a session is open) and reused next time: opening a session
loads its newest score file whose model fingerprint matches.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

DEFAULT_METHODS = "head-grad,kv-group-grad,neuron-taylor,layer-bi,sv,sv-grad"


class ScoreFormScreen(ModalScreen[dict | None]):
    """data, tokens, seq-len, methods -> the arguments of surgery.importance.score_source."""

    DEFAULT_CSS = """
    ScoreFormScreen { align: center middle; }
    ScoreFormScreen > Vertical { width: 84; height: auto; border: round $primary; background: $surface; padding: 0 1; }
    """
    BINDINGS = [Binding("escape", "cancel", "cancel", id="score.cancel")]
    FIELDS = (("data", "Calibration text (.txt / .jsonl / .parquet / hf:NAME)"), ("tokens", "Tokens"),
              ("seq_len", "Sequence length"), ("methods", "Methods (comma-separated)"))

    def __init__(self, defaults: dict[str, str]) -> None:
        super().__init__()
        self.defaults = defaults

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("[b]Score the model[/b] (runs in the background; Esc on the model screen cancels it)")
            for key, label in self.FIELDS:
                yield Label(label)
                yield Input(value=self.defaults.get(key, ""), id=f"s-{key}")
            yield Button("score", variant="primary", id="go")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss({key: self.query_one(f"#s-{key}", Input).value.strip() for key, _ in self.FIELDS})

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.on_button_pressed(None)  # type: ignore[arg-type]

    def action_cancel(self) -> None:
        self.dismiss(None)
