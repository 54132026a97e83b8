"""The compare screen: the metrics table of `workbench compare` for the original model, the plan's latest output
and every finished job's output, with deltas against the original, plus bars for the headline numbers.

Evaluation runs in a worker with the same library call as the CLI (records are reused from the session's evals/
when the same model, data and settings were measured before). Defaults keep it quick: size, and perplexity on the
first 8 x 512 tokens of the calibration text.
"""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from workbench.plots import bar


def headline_bars(columns: list[str], values: dict[str, list[float | None]], width: int = 30) -> str:
    """Text bars per model for a few metrics (pure: tested without a screen)."""
    lines = []
    for metric, row in values.items():
        present = [v for v in row if v is not None]
        if not present:
            continue
        vmax = max(present)
        lines.append(f"[b]{metric}[/b]")
        for label, value in zip(columns, row):
            shown = "n/a" if value is None else f"{value:,.4g}"
            lines.append(f"  {label[:24]:<24} {bar(value or 0.0, vmax, width):<{width}} {shown}")
    return "\n".join(lines)


class CompareScreen(Screen):
    """Rows = metrics, columns = models; `r` re-runs (reusing stored records)."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "back", id="compare.back"),
        Binding("r", "run", "re-run", id="compare.run"),
    ]

    def __init__(self, sources: list[str], data: str | None, records: Path | None) -> None:
        super().__init__()
        self.sources, self.data, self.records = sources, data, records

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll():
            yield Static(f"comparing {len(self.sources)} model(s) · data {self.data or 'none'}", id="compare-info")
            yield DataTable(id="compare", zebra_stripes=True)
            yield Static(id="bars")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "compare"
        self.action_run()

    def action_run(self) -> None:
        self.query_one("#compare-info", Static).update(f"evaluating {len(self.sources)} model(s)…")
        self.evaluate()

    @work(thread=True, exclusive=True, group="compare", exit_on_error=False, description="comparing models")
    def evaluate(self) -> None:
        from textual.worker import get_current_worker

        from surgery.metrics import EvalSettings, build_comparison, compare_sources
        from surgery.metrics.records import RecordStore

        # seq_len None: 2048 or the model's own limit; 4096 tokens keep a CPU comparison to seconds
        settings = EvalSettings(data=self.data, max_tokens=4096, speed=False)
        try:
            evals = compare_sources(self.sources, settings, store=RecordStore(self.records),
                                    cancel=get_current_worker().cancelled_event)
        except Exception as exc:  # noqa: BLE001 - shown to the user; the screen stays usable
            self.app.call_from_thread(self.app.notify, str(exc).splitlines()[0], title="compare", severity="error")
            self.app.call_from_thread(self.query_one("#compare-info", Static).update, f"failed: {exc}")
            return
        self.app.call_from_thread(self.show, build_comparison(evals))

    def show(self, comparison) -> None:
        from surgery.metrics.table import cell_text

        table = self.query_one("#compare", DataTable)
        table.clear(columns=True)
        table.add_column("metric")
        for column in comparison.columns:
            table.add_column(column)
        headline: dict[str, list[float | None]] = {}
        for row in comparison.rows:
            table.add_row(row.name, *(cell_text(c, with_delta=True) for c in row.cells))
            if row.name in ("params", "perplexity", "bytes as checkpoint"):  # like with like (see table.py)
                headline[row.name] = [c.value if isinstance(c.value, (int, float)) else None for c in row.cells]
        self.query_one("#bars", Static).update(headline_bars(comparison.columns, headline))
        notes = "\n".join(comparison.notes)  # the legend: which column is which path, which tokens
        self.query_one("#compare-info", Static).update(f"{len(comparison.columns)} model(s)" + (f"\n{notes}" if notes else ""))
