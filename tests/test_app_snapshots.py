"""Snapshots of the key screens at 80x24 and 120x40 (pytest-textual-snapshot; update with --snapshot-update)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tiny_models import make_model
from workbench.app import WorkbenchApp

SIZES = [(80, 24), (120, 40)]


@pytest.fixture()
def tiny_app(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_model("llama").save_pretrained(tmp_path / "tiny-llama")
    g = torch.Generator().manual_seed(0)
    scores = {f"model.layers.{i}.self_attn/head_grad": torch.rand(4, generator=g) for i in range(3)}
    scores.update({f"model.layers.{i}.mlp/neuron_taylor": torch.rand(96, generator=g) for i in range(3)})
    scores["model/layer_bi"] = torch.tensor([0.3, 0.1, 0.2])
    save_file(scores, str(tmp_path / "scores.safetensors"))
    return WorkbenchApp("tiny-llama", load_weights=False, scores="scores.safetensors")


async def _settle(pilot):
    app = pilot.app
    for _ in range(100):
        if app.editor is not None and app.scores is not None:
            break
        await pilot.pause(0.05)
    await app.workers.wait_for_complete()
    app.clear_notifications()  # toasts expire on a timer: keep them out of the pictures
    await pilot.pause()


def _marks(pilot):
    app = pilot.app
    app.edit(lambda e: e.toggle_group(1, 0))
    app.edit(lambda e: e.toggle_mlp(2))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_model_screen(snap_compare, tiny_app, size):
    async def run_before(pilot):
        await _settle(pilot)
        _marks(pilot)
        await _settle(pilot)

    assert snap_compare(tiny_app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_screen(snap_compare, tiny_app, size):
    async def run_before(pilot):
        await _settle(pilot)
        _marks(pilot)
        await pilot.press("down", "enter")
        await _settle(pilot)

    assert snap_compare(tiny_app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_plan_panel(snap_compare, tiny_app, size):
    async def run_before(pilot):
        await _settle(pilot)
        _marks(pilot)
        await pilot.press("p")
        await _settle(pilot)

    assert snap_compare(tiny_app, terminal_size=size, run_before=run_before)


FORMS = {  # fixed defaults: the real ones name this machine's data paths
    "score": {"data": "wiki.test.raw", "tokens": "4096", "seq_len": "256",
              "methods": "head-grad,kv-group-grad,neuron-taylor,layer-bi,sv,sv-grad"},
    "job": {"teacher": "tiny-llama", "student": "exports/pruned", "data": "input.txt", "losses": "kl:1.0,ce:0.1",
            "steps": "100"},
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_forms_fit_80x24(snap_compare, tiny_app, form):
    """Every field and the button on screen at 80x24 (the score form was 84 columns wide, the job form cut off)."""
    from workbench.screens.jobs import NewJobScreen
    from workbench.screens.score import ScoreFormScreen

    async def run_before(pilot):
        await _settle(pilot)
        pilot.app.push_screen((ScoreFormScreen if form == "score" else NewJobScreen)(FORMS[form]))
        await _settle(pilot)
        screen = pilot.app.screen
        for field in screen.query("Input"):
            field.cursor_blink = False  # a blinking cursor would make the picture depend on timing
        await pilot.pause()
        inside = screen.query_one("VerticalScroll").region
        assert inside.right <= 80 and inside.bottom <= 24
        for widget in [*screen.query("Input"), screen.query_one("Button")]:
            assert inside.contains_region(widget.region), widget

    assert snap_compare(tiny_app, terminal_size=(80, 24), run_before=run_before)


@pytest.fixture()
def width_app(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_model("llama").save_pretrained(tmp_path / "tiny-llama")
    g = torch.Generator().manual_seed(0)
    save_file({"model/channel_norm": torch.rand(64, generator=g) + 0.1}, str(tmp_path / "scores.safetensors"))
    return WorkbenchApp("tiny-llama", load_weights=False, scores="scores.safetensors")


@pytest.fixture()
def moe_app(tmp_path, monkeypatch):
    from test_prune_experts import moe_model

    monkeypatch.chdir(tmp_path)
    moe_model("qwen3_moe").save_pretrained(tmp_path / "tiny-moe")
    g = torch.Generator().manual_seed(0)
    scores = {f"model.layers.{i}.mlp/expert_reap": torch.rand(6, generator=g) for i in range(2)}
    save_file(scores, str(tmp_path / "scores.safetensors"))
    return WorkbenchApp("tiny-moe", load_weights=False, scores="scores.safetensors")


def test_width_view_80x24(snap_compare, width_app):
    """Channels sorted with the cut line; the summary names the legal sizes (multiples of the 4 heads)."""
    async def run_before(pilot):
        await _settle(pilot)
        await pilot.press("W", "plus", "plus")
        await _settle(pilot)

    assert snap_compare(width_app, terminal_size=(80, 24), run_before=run_before)


def test_moe_layer_screen_80x24(snap_compare, moe_app):
    """The expert grid: one expert marked in both MoE layers (in the plan), the focused one's value below."""
    async def run_before(pilot):
        await _settle(pilot)
        pilot.app.edit(lambda e: e.toggle_expert(0, 2))
        pilot.app.edit(lambda e: e.toggle_expert(1, 4))
        await pilot.press("enter")
        await _settle(pilot)
        pilot.app.screen.query_one("ExpertGrid").focus()
        await pilot.pause()

    assert snap_compare(moe_app, terminal_size=(80, 24), run_before=run_before)
