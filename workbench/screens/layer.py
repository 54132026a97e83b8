"""The layer screen: head grid, neuron importance curve with the cut (or, in an MoE layer, the expert grid),
singular-value spectra with the rank."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Select, Static

from workbench.plots import log_curve, log_spectrum, lowest, plotext_chart
from workbench.widgets.expert_grid import ExpertGrid
from workbench.widgets.head_grid import HeadGrid


class LayerScreen(Screen):
    """Everything prunable in one layer. Keys: space/g mark heads, +/- move the neuron cut, [/] the rank."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "back", id="layer.back"),
        # pairs share one footer entry ("+/- cut"), so the app's keys (q, ?, u) still fit at 80 columns
        Binding("plus,equals_sign", "neurons(1)", "cut", key_display="+/-", id="layer.cut_more"),
        Binding("minus", "neurons(-1)", "cut less", show=False, id="layer.cut_less"),
        Binding("left_square_bracket", "rank(-1)", "rank", key_display="[/]", id="layer.rank_down"),
        Binding("right_square_bracket", "rank(1)", "rank +", show=False, id="layer.rank_up"),
        Binding("x", "clear_rank", "full rank", id="layer.clear_rank"),
        Binding("k", "weakest_per_group", "weakest", id="layer.weakest_per_group"),
        Binding("E", "lowest_experts", "lowest N experts, every MoE layer", show=False, id="layer.lowest_experts"),
        Binding("C", "app.width_scores", "compute expert scores", show=False, id="layer.width_scores"),
    ]
    NEURON_STEP = 1 / 32  # one key press moves the cut by 1/32 of the MLP width

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer_index = layer

    def compose(self) -> ComposeResult:
        app = self.app
        s = app.editor.shape.layers[self.layer_index]
        yield Header()
        with VerticalScroll():
            yield Static(id="summary")
            yield HeadGrid(s.heads, s.kv_heads, id="heads")
            if self.num_experts:
                yield ExpertGrid(self.num_experts, app.editor.shape.top_k, id="experts")
            yield Static(id="neurons")
            yield Select([(name, name) for name in app.linear_names()], prompt="Linear for the spectrum",
                         id="linear", allow_blank=False)
            yield Static(id="spectrum")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = f"layer {self.layer_index}"
        self.query_one(HeadGrid).focus()
        self.refresh_view()

    @property
    def num_experts(self) -> int:
        experts = self.app.editor.shape.experts
        return experts[self.layer_index] if experts else 0

    @property
    def linear(self) -> str:
        value = self.query_one("#linear", Select).value
        return value if isinstance(value, str) else self.app.linear_names()[0]

    def refresh_view(self) -> None:
        app, layer = self.app, self.layer_index
        cut = app.editor.resolution.layers[layer]
        after = cut.result_shape()
        s = cut.shape
        pending = app.editor.pending_note(layer)
        mlp = (f"experts {len(cut.kept_experts)}/{cut.num_experts}" if cut.num_experts  # an MoE block: no neurons
               else f"MLP {after.mlp}/{s.mlp}")
        self.query_one("#summary", Static).update(
            f"[b]layer {layer}[/b] · heads {after.heads}/{s.heads} · KV groups {after.kv_heads}/{s.kv_heads} · {mlp}"
            + (" · [b]DROPPED[/b]" if cut.dropped else "")
            + (f"\n[b]pending[/b] (not in the plan yet) {pending.split(': ', 1)[1]}" if pending else "")
        )
        if self.num_experts:
            self.refresh_experts()
        head_metric = app.metric_for("head")
        grid = self.query_one(HeadGrid)
        grid.update_state(app.scores.head(layer, head_metric) if app.scores and head_metric else None,
                          head_metric or "", app.editor.layers[layer].heads, app.editor.pending.get(layer, set()))
        width = max(40, (self.size.width or 80) - 4)
        neuron_metric = app.metric_for("neuron")
        neurons = app.scores.neuron(layer, neuron_metric) if app.scores and neuron_metric else None
        n_cut = len(app.editor.layers[layer].neurons)
        if self.num_experts:
            chart = (f"mixture-of-experts block: {self.num_experts} experts, router top-k {app.editor.shape.top_k}; "
                     "cut experts in the grid (space; E: the lowest N in every MoE layer)")
        elif neurons:
            ys, at = log_curve(neurons, n_cut)
            chart = plotext_chart({f"log10 |{neuron_metric}|, lowest first": ys}, width, 12,
                                  title=f"neurons by {neuron_metric} (cut {n_cut})", vline=at)
        else:
            chart = f"MLP: {n_cut} of {s.mlp} neurons cut (score the model to see their importance)"
        self.query_one("#neurons", Static).update(chart)
        rank = app.editor.layers[layer].ranks.get(self.linear)
        spectrum = {}
        if app.scores:
            for metric in ("sv", "sv_grad", "sv_act"):
                values = app.scores.spectrum(layer, self.linear, metric)
                if values:
                    spectrum[f"log10 |{metric}|"] = log_spectrum(values)
        if spectrum:
            text = plotext_chart(spectrum, width, 12, title=f"{self.linear} spectrum (rank {rank or 'full'})",
                                 vline=rank)
        else:
            text = f"{self.linear}: rank {rank or 'full'} (score with sv / sv-grad to see the spectrum)"
        self.query_one("#spectrum", Static).update(text)

    def refresh_experts(self) -> None:
        app, layer = self.app, self.layer_index
        metric = app.metric_for("expert")
        self.query_one(ExpertGrid).update_state(app.scores.expert(layer, metric) if app.scores and metric else None,
                                                metric or "", app.editor.experts_shown(layer))

    def on_expert_grid_toggle(self, event: ExpertGrid.Toggle) -> None:
        self.app.edit(lambda e: e.toggle_expert(self.layer_index, event.expert))
        self.app.refresh_views()

    def action_lowest_experts(self) -> None:
        from workbench.screens.prompt import PromptScreen

        if not self.num_experts:
            self.app.notify("this layer has no experts", severity="warning")
            return

        def done(answer: str | None) -> None:
            if answer:
                try:
                    self.app.mark_lowest_experts(int(answer))
                except ValueError:
                    self.app.notify("a whole number of experts, e.g. 2", severity="error")

        self.app.push_screen(PromptScreen("Remove the N lowest-scored experts of every MoE layer (N):", "1"), done)

    def on_head_grid_toggle(self, event: HeadGrid.Toggle) -> None:
        if event.head is not None:
            self.app.edit(lambda e: e.toggle_head(self.layer_index, event.head))
        else:
            self.app.edit(lambda e: e.toggle_group(self.layer_index, event.group))
        self._after_head_edit()

    def _after_head_edit(self) -> None:
        note = self.app.editor.pending_note(self.layer_index)
        if note:  # nothing reached the plan: say what the GQA rule still asks for
            self.app.notify(note.split(": ", 1)[1], title="pending", severity="warning", timeout=8)
        self.app.refresh_views()

    def action_weakest_per_group(self) -> None:
        """Add the lowest-scored unmarked head of every KV group (GQA-legal whenever the marks were)."""
        app, layer = self.app, self.layer_index
        metric = app.metric_for("head")
        scores = app.scores.head(layer, metric) if app.scores and metric else None
        if not scores:
            app.notify("no head scores: load (o) or compute (s) scores first", severity="warning")
            return
        s = app.editor.shape.layers[layer]
        heads = app.editor.heads_shown(layer)
        for k in range(s.kv_heads):
            free = [h for h in range(k * s.group_size, (k + 1) * s.group_size) if h not in heads]
            if len(free) > 1:  # never the group's last head: that would be a KV group mark
                heads.add(min(free, key=lambda h: scores[h]))
        app.edit(lambda e: e.set_heads(layer, heads, f"weakest head of every group in layer {layer}"))
        self._after_head_edit()

    def on_select_changed(self, event: Select.Changed) -> None:
        self.refresh_view()

    def action_neurons(self, direction: int) -> None:
        app = self.app
        width = app.editor.shape.layers[self.layer_index].mlp
        step = max(1, round(width * self.NEURON_STEP))
        count = max(0, min(width - 1, len(app.editor.layers[self.layer_index].neurons) + direction * step))
        metric = app.metric_for("neuron")
        scores = app.scores.neuron(self.layer_index, metric) if app.scores and metric else None
        # without scores the cut takes the highest indices: a visible, deterministic placeholder choice
        chosen = lowest(scores, count) if scores else list(range(width - count, width))
        app.edit(lambda e: e.set_neurons(self.layer_index, chosen))

    def action_rank(self, direction: int) -> None:
        """Ranks move in steps of 1/16 of the full rank, between 1 and the break-even rank (past it the factors
        are bigger than the matrix): `[` from full rank starts at the break-even rank, `]` past it is full rank."""
        from workbench.editor import useful_rank

        out_f, in_f = self.app.editor.linear_shape(self.layer_index, self.linear)
        full, useful = min(out_f, in_f), useful_rank(out_f, in_f)
        current = self.app.editor.layers[self.layer_index].ranks.get(self.linear)
        step = max(1, full // 16)
        if current is None:
            rank = useful if direction < 0 else None
        else:
            rank = max(1, current + direction * step)
            rank = None if rank > useful else rank
        self.app.edit(lambda e: e.set_rank(self.layer_index, self.linear, rank))

    def action_clear_rank(self) -> None:
        self.app.edit(lambda e: e.set_rank(self.layer_index, self.linear, None))
