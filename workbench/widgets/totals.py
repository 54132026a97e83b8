"""The totals bar: parameters and FLOPs before -> after, estimated speed-up, source, fingerprint, status."""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static

from workbench.cli_common import fmt_params


class TotalsBar(Static):
    """One or two lines of totals; wraps on narrow terminals instead of cutting text off."""

    DEFAULT_CSS = """
    TotalsBar { height: auto; padding: 0 1; background: $panel; color: $foreground; }
    """

    estimate = reactive(None, layout=True)
    source = reactive("")
    fingerprint = reactive("")
    statuses: reactive[dict] = reactive(dict, layout=True)

    def set_status(self, key: str, text: str) -> None:
        statuses = dict(self.statuses)
        if text:
            statuses[key] = text
        else:
            statuses.pop(key, None)
        self.statuses = statuses

    def render(self) -> str:
        e = self.estimate
        if e is None:
            sizes = "params …"
        else:
            sizes = (
                f"params {fmt_params(e.params_before)} → {fmt_params(e.params_after)} "
                f"([b]-{e.removed_fraction:.1%}[/b]) · FLOPs/tok {e.flops_before / 1e9:.3f}G → "
                f"{e.flops_after / 1e9:.3f}G · est. speed-up [b]{e.speedup:.2f}x[/b]"
            )
        status = " · ".join(f"{k}: {v}" for k, v in self.statuses.items())
        fp = self.fingerprint[:19] + "…" if self.fingerprint else ""
        return f"{sizes}\n[dim]{self.source} {fp}[/dim] {status}"
