"""The model screen: the hidden size (and, for MoE models, experts per layer and the router's top-k), then one row
per layer with kept/total counts, parameters and an importance bar."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from workbench.cli_common import fmt_params
from workbench.plots import bar
from workbench.widgets.totals import TotalsBar

# explicit widths: auto-sized columns were seen keeping their first (header-only) width after clear() + re-add
COLUMNS = {"layer": 5, "heads": 7, "KV": 5, "MLP": 11, "params": 8, "importance": 11, "state": 16}


class ModelScreen(Screen):
    """Layer table + totals. Marks on whole layers happen here; Enter opens the layer screen."""

    BINDINGS = [
        Binding("enter", "open_layer", "layer", id="model.open_layer"),
        Binding("space", "toggle_layer", "drop layer", id="model.toggle_layer"),
        Binding("a", "toggle_attention", "drop attn", id="model.toggle_attention"),
        Binding("m", "toggle_mlp", "drop MLP", id="model.toggle_mlp"),
        Binding("W", "width", "width view", show=False, id="model.width"),
    ]
    columns_added = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield TotalsBar(id="totals")
        yield Static(id="shape-info")
        table = DataTable(id="layers", cursor_type="row", zebra_stripes=True)
        yield table
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one("#layers", DataTable)
        self.refresh_table()

    def refresh_table(self) -> None:
        """Redraw every row from the app's report, marks and scores (cheap: one row per layer)."""
        app = self.app
        report, editor = app.report, app.editor
        table = self.query_one("#layers", DataTable)
        if report is None or editor is None:
            return
        moe = bool(editor.shape.experts)
        if not self.columns_added:  # the experts column only for MoE models, so dense tables keep their width
            for name, width in COLUMNS.items():
                table.add_column(name, key=name, width=width)
                if name == "MLP" and moe:
                    table.add_column("experts", key="experts", width=7)
            self.columns_added = True
        self.query_one("#shape-info", Static).update(shape_line(editor))
        cursor = table.cursor_row
        table.clear()
        importance = app.layer_importance()
        vmax = max(importance) if importance else 0.0
        # parameters after the plan, once the estimate for this very revision is in (until then: before)
        estimate = app.totals.estimate if app.shown_revision == app.revision else None
        after_params = getattr(estimate, "layer_params_after", ()) or ()
        for layer, cut in zip(report.layers, editor.resolution.layers):
            after = cut.result_shape()
            state = []
            if cut.dropped:
                state.append("DROPPED")
            if cut.drop_attention:
                state.append("no attn")
            if cut.drop_mlp:
                state.append("no MLP")
            if cut.low_rank:
                state.append("low-rank")
            if layer.index in editor.pending:
                state.append("pending")
            gone = cut.dropped
            params = after_params[layer.index] if len(after_params) == len(report.layers) else layer.params_total
            experts = []
            if moe:
                experts = ["-" if gone or not cut.num_experts else f"{len(cut.kept_experts)}/{cut.num_experts}"]
            table.add_row(
                str(layer.index),
                "-" if gone else f"{after.heads}/{layer.heads}",
                "-" if gone else f"{after.kv_heads}/{layer.kv_heads}",
                "-" if gone or cut.num_experts else f"{after.mlp}/{layer.mlp}",
                *experts,
                fmt_params(params),
                bar(importance[layer.index], vmax, 10) if importance else "",
                " ".join(state),
                key=str(layer.index),
            )
        if cursor is not None and table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))

    @property
    def current_layer(self) -> int:
        return self.query_one("#layers", DataTable).cursor_row

    def action_open_layer(self) -> None:
        self.app.open_layer(self.current_layer)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.app.open_layer(event.cursor_row)

    def action_toggle_layer(self) -> None:
        self.app.edit(lambda e: e.toggle_layer(self.current_layer))

    def action_toggle_attention(self) -> None:
        self.app.edit(lambda e: e.toggle_attention(self.current_layer))

    def action_width(self) -> None:
        self.app.action_width()

    def action_toggle_mlp(self) -> None:
        self.app.edit(lambda e: e.toggle_mlp(self.current_layer))


def shape_line(editor) -> str:
    """"hidden 576 → 512 (W: width view)" and, for MoE models, "experts 8/layer (6 kept), router top-2"."""
    shape, resolution = editor.shape, editor.resolution
    after = resolution.result_hidden
    text = f"hidden {shape.hidden}" + (f" → [b]{after}[/b]" if after != shape.hidden else "")
    if shape.experts:
        sparse = [n for n in shape.experts if n]
        kept = {len(c.kept_experts) for c in resolution.layers if c.num_experts and not c.dropped}
        counts = "/".join(map(str, sorted(set(sparse))))
        text += f" · experts {counts} per MoE layer ({len(sparse)} of {len(shape.experts)} layers)"
        if kept and kept != set(sparse):
            text += f" → [b]{'/'.join(map(str, sorted(kept)))}[/b] kept"
        text += f", router top-{shape.top_k}"
    return text + " [dim](W: width view)[/dim]"
