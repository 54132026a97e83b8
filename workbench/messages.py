"""App-wide messages: results of workers, posted back to the UI thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


@dataclass
class ModelInspected(Message):
    """The source resolved and its headers read: the layer table can be drawn."""

    report: Any  # surgery.inspect.ModelReport
    config: dict
    path: str


@dataclass
class WeightsLoaded(Message):
    loaded: Any  # surgery.loading.LoadedModel


@dataclass
class EstimateReady(Message):
    estimate: Any  # surgery.estimate.Estimate
    revision: int = 0


@dataclass
class ScoresReady(Message):
    scores: Any  # workbench.scores_view.ScoreView


@dataclass
class MarksChanged(Message):
    """The plan under edit changed (mark, unmark, undo, redo, suggestion)."""

    description: str


@dataclass
class StatusText(Message):
    """A short status for the totals bar (e.g. "weights: loading")."""

    key: str
    text: str
