"""The TUI's width view and expert grid (issue 18) and its recovery entries (issue 14), through Pilot on tiny
models: marked channels / experts become prune_hidden / prune_experts steps, illegal ones are refused with the
resolver's one-line reason, a reconstruct step is added from a form, and a compress job starts from the jobs form."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from test_prune_experts import moe_model
from tiny_models import make_model, tiny_tokenizer
from workbench.app import WorkbenchApp
from workbench.screens.layer import LayerScreen
from workbench.screens.width import WidthScreen, width_step
from workbench.widgets.expert_grid import ExpertGrid


async def opened(pilot, app):
    for _ in range(100):
        if app.editor is not None:
            break
        await pilot.pause(0.05)
    await app.workers.wait_for_complete()
    await pilot.pause()
    assert app.editor is not None, "the model never opened"


def steps_of(app, op):
    return [json.loads(s.model_dump_json()) for s in app.editor.plan().steps if s.op == op]


@pytest.fixture()
def tiny_llama(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_model("llama").save_pretrained(tmp_path / "tiny-llama")
    channels = torch.arange(64, dtype=torch.float32).flip(0) + 1.0  # channel 63 lowest, then 62, ...
    save_file({"model/channel_norm": channels}, str(tmp_path / "s.safetensors"))
    return "tiny-llama"


@pytest.fixture()
def tiny_moe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    moe_model("qwen3_moe").save_pretrained(tmp_path / "tiny-moe")  # 2 MoE layers, 6 experts, top-2
    tiny_tokenizer().save_pretrained(tmp_path / "tiny-moe")
    reap = {f"model.layers.{i}.mlp/expert_reap": torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0]) + i for i in range(2)}
    save_file(reap, str(tmp_path / "e.safetensors"))
    return "tiny-moe"


async def test_width_view_cuts_lowest_channels_and_refuses_sizes_heads_cannot_divide(tiny_llama):
    app = WorkbenchApp(tiny_llama, load_weights=False, scores="s.safetensors")
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        assert "hidden 64" in str(app.screen.query_one("#shape-info").render())
        await pilot.press("W")
        await pilot.pause()
        assert isinstance(app.screen, WidthScreen)
        assert "residual channels by channel_norm" in str(app.screen.query_one("#channels").render())
        await pilot.press("plus")  # one step: the 4 heads of LlamaConfig must divide the width
        await pilot.pause()
        assert steps_of(app, "prune_hidden") == [{"op": "prune_hidden", "channels": [60, 61, 62, 63],
                                                  "rescale_norms": True}]
        await pilot.press("plus")
        assert steps_of(app, "prune_hidden")[0]["channels"] == list(range(56, 64))
        app.screen.set_cut(6)  # 58 channels: not a multiple of 4 -> refused, the nearest legal sizes named
        await pilot.pause()
        refusal = [n.message for n in app._notifications if n.title == "refused"][-1]
        assert "cannot be expressed" in refusal and "56 (remove 8 channels)" in refusal
        assert "60 (remove 4 channels)" in refusal and "\n" not in refusal
        assert len(steps_of(app, "prune_hidden")[0]["channels"]) == 8  # nothing changed
        app.screen.set_cut(64)  # every channel
        await pilot.pause()
        assert "keep at least one" in [n.message for n in app._notifications if n.title == "refused"][-1]
        await pilot.press("u")  # back to the first cut, then the model screen shows the new width
        assert len(steps_of(app, "prune_hidden")[0]["channels"]) == 4
        await pilot.press("escape")
        await pilot.pause()
        assert "hidden 64 → 60" in str(app.screen.query_one("#shape-info").render())
    assert width_step(576, 9, True) == 9 and width_step(2048, 32, True) == 32 and width_step(64, 4, False) == 1


async def test_expert_grid_marks_are_pending_until_every_moe_layer_matches_and_top_k_is_kept(tiny_moe):
    app = WorkbenchApp(tiny_moe, load_weights=False, scores="e.safetensors")
    async with app.run_test(size=(100, 40)) as pilot:
        await opened(pilot, app)
        info = str(app.screen.query_one("#shape-info").render())
        assert "experts 6 per MoE layer (2 of 2 layers)" in info and "top-2" in info
        await pilot.press("enter")  # layer 0
        await pilot.pause()
        assert isinstance(app.screen, LayerScreen)
        grid = app.screen.query_one(ExpertGrid)
        grid.focus()
        await pilot.press("right", "space")  # expert 1 of layer 0 alone: layer 1 would keep 6, layer 0 five
        await pilot.pause()
        assert steps_of(app, "prune_experts") == [] and app.editor.pending_experts == {0: {1}}
        assert any("pending" == n.title and "same number of experts" in n.message for n in app._notifications)
        assert "?e1" in str(grid.render())
        await pilot.press("escape", "down", "enter")  # layer 1: one expert there too -> both reach the plan
        await pilot.pause()
        grid = app.screen.query_one(ExpertGrid)
        grid.focus()
        await pilot.press("space")
        await pilot.pause()
        assert steps_of(app, "prune_experts") == [{"op": "prune_experts", "layer": 0, "experts": [1]},
                                                  {"op": "prune_experts", "layer": 1, "experts": [0]}]
        assert app.editor.pending_experts == {} and "×e0" in str(grid.render())
        assert app.mark_lowest_experts(4)  # 6 - 4 = 2 = top-k: allowed; the lowest REAP scores go
        assert steps_of(app, "prune_experts") == [{"op": "prune_experts", "layer": 0, "experts": [2, 3, 4, 5]},
                                                  {"op": "prune_experts", "layer": 1, "experts": [2, 3, 4, 5]}]
        assert not app.mark_lowest_experts(5)  # one expert left: below the router's top-k
        await pilot.pause()
        refusal = [n.message for n in app._notifications if n.title == "refused"][-1]
        assert "fewer than the router's top-k (2): remove at most 4" in refusal
        await pilot.press("escape")
        await pilot.pause()
        table = app.screen.query_one("#layers")
        assert str(table.get_row_at(0)[4]) == "2/6"  # the experts column
