"""The score form: calibration data and methods; scoring runs in a worker with progress and can be cancelled.

Results are written into the session's scores/ (when a session is open) and reused next time: opening a session
loads its newest score file whose model fingerprint matches.
"""

from __future__ import annotations

from workbench.screens.form import FormScreen

DEFAULT_METHODS = "head-grad,kv-group-grad,neuron-taylor,layer-bi,sv,sv-grad"


class ScoreFormScreen(FormScreen):
    """data, tokens, seq-len, methods -> the arguments of surgery.importance.score_source."""

    TITLE_TEXT = "[b]Score the model[/b] (in the background; ctrl+c cancels it)"
    FIELDS = (("data", "Calibration text"), ("tokens", "Tokens"), ("seq_len", "Sequence length"),
              ("methods", "Methods"))
    BUTTON = "score"


class WidthScoreFormScreen(FormScreen):
    """data, tokens, seq-len -> channel norms (and expert frequency / REAP on MoE models), computed in the app."""

    TITLE_TEXT = ("[b]Channel and expert scores[/b] (channel_norm; expert_freq, expert_reap on MoE models; in the "
                  "background)")
    FIELDS = (("data", "Calibration text"), ("tokens", "Tokens"), ("seq_len", "Sequence length"))
    BUTTON = "score"
