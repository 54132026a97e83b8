"""The Textual app on a tiny model, driven through Pilot: open, mark (a refused GQA-illegal mark included),
undo/redo, save the plan, apply, and the output loads with plain transformers."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from surgery.plan import load_plan
from tiny_models import make_model, tokens
from workbench.app import WorkbenchApp
from workbench.editor import PlanEditor
from workbench.screens.layer import LayerScreen
from workbench.screens.plan import PlanScreen


@pytest.fixture()
def tiny_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_model("llama").save_pretrained(tmp_path / "tiny-llama")
    return "tiny-llama"


async def opened(pilot, app):
    for _ in range(100):
        if app.editor is not None:
            break
        await pilot.pause(0.05)
    await app.workers.wait_for_complete()
    await pilot.pause()
    assert app.editor is not None, "the model never opened"


async def test_mark_refuse_undo_redo_save_apply(tiny_dir, tmp_path):
    app = WorkbenchApp(tiny_dir, load_weights=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        await pilot.press("down", "enter")  # layer 1
        await pilot.pause()
        assert isinstance(app.screen, LayerScreen) and app.screen.layer_index == 1
        await pilot.press("space")  # head 0 alone: group 0 would keep 1 head, group 1 keeps 2 -> pending
        await pilot.pause()
        assert app.editor.layers[1].heads == set() and app.editor.pending == {1: {0}}
        assert any("GQA" in n.message and "1 in group 1" in n.message for n in app._notifications)
        assert "pending" in str(app.screen.query_one("#summary").render())
        await pilot.press("right", "right", "space")  # head 2 (group 1): one head from each group -> in the plan
        await pilot.pause()
        assert app.editor.layers[1].heads == {0, 2} and app.editor.pending == {}
        await pilot.press("u")
        assert app.editor.layers[1].heads == set()
        await pilot.press("U")
        assert app.editor.layers[1].heads == {0, 2}
        await pilot.press("left", "left", "g")  # the whole of group 0 (+ head 2 of group 1): still legal
        await pilot.pause()
        assert app.editor.layers[1].heads == {0, 1, 2}
        await pilot.press("escape", "down", "m")  # drop the MLP of layer 2
        await pilot.pause()
        assert app.editor.layers[2].drop_mlp
        await pilot.press("m")  # and bring it back, so the result stays uniform-loadable... not quite: heads differ
        await pilot.press("p")
        await pilot.pause()
        assert isinstance(app.screen, PlanScreen)
        app.action_save_plan()
        await pilot.pause()
        await pilot.press(*"../saved.json")  # appended to the default "plan.json"? clear first
        app.screen.query_one("Input").value = str(tmp_path / "saved.json")
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
    plan = load_plan(tmp_path / "saved.json")
    assert [s.op for s in plan.steps] == ["prune_heads"]
    assert plan.steps[0].layer == 1 and plan.steps[0].heads == [0, 1, 2]
    # the file replays alone: it names the model (absolute path) and its weights, like a `plan suggest` plan
    assert plan.model.source == str(tmp_path / "tiny-llama") and plan.model.fingerprint.startswith("sha256:")
    assert plan.provenance["tool"] == "workbench TUI"


async def test_apply_from_the_app_writes_a_plain_loadable_model(tiny_dir, tmp_path):
    app = WorkbenchApp(tiny_dir, load_weights=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        for layer in range(3):  # KV group 1 of every layer: uniform, so plain transformers can load it
            assert app.edit(lambda e, i=layer: e.toggle_group(i, 1))
        app.run_apply(str(tmp_path / "out"))
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert any("loads with transformers" in n.message for n in app._notifications)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_key_value_heads == 1
    with torch.no_grad():
        assert model(tokens()).logits.shape[-1] == 128


async def test_scores_colour_the_grid_and_mark_lowest_respects_gqa(tiny_dir, tmp_path):
    heads = {f"model.layers.{i}.self_attn/head_grad": torch.tensor([4.0, 3.0, 2.0, 1.0]) + i for i in range(3)}
    neurons = {f"model.layers.{i}.mlp/neuron_taylor": torch.arange(96, dtype=torch.float32).flip(0) for i in range(3)}
    save_file({**heads, **neurons, "model/layer_bi": torch.tensor([0.3, 0.1, 0.2])}, str(tmp_path / "s.safetensors"))
    app = WorkbenchApp(tiny_dir, load_weights=False, scores=str(tmp_path / "s.safetensors"))
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        assert app.scores is not None and app.metric_for("head") == "head_grad"
        app.mark_lowest("heads", 0.5)  # one head per KV group: the lower of each pair
        app.mark_lowest("neurons", 0.25)
        await pilot.pause()
        assert app.editor.layers[0].heads == {1, 3}
        assert app.editor.layers[0].neurons == list(range(72, 96))
        await pilot.press("enter")
        await pilot.pause()
        rendered = str(app.screen.query_one("HeadGrid").render())
        assert "4.00e+00" in rendered


async def test_keypress_answers_while_a_worker_runs(tiny_dir):
    """The UI thread stays free: a key press is handled promptly while a long worker is busy."""
    app = WorkbenchApp(tiny_dir, load_weights=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)

        def busy():  # what workers do: torch kernels (they release the GIL between Python steps)
            a = torch.randn(384, 384)
            t = time.perf_counter()
            while time.perf_counter() - t < 2.0:
                a = torch.tanh(a @ a.T / 384)

        app.run_worker(busy, thread=True, group="busy")
        await asyncio.sleep(0.2)  # the worker is in full swing
        table = app.screen.query_one("#layers")
        start = time.perf_counter()
        app.simulate_key("down")
        while table.cursor_row != 1 and time.perf_counter() - start < 10:
            await asyncio.sleep(0.005)
        latency = time.perf_counter() - start
        assert table.cursor_row == 1
        assert any(w.group == "busy" and w.is_running for w in app.workers)  # measured while it ran
        print(f"key latency while a worker runs: {latency * 1000:.0f} ms")
        app.workers.cancel_group(app, "busy")


def test_editor_refuses_marks_inside_a_dropped_layer():
    from surgery.errors import PlanError
    from surgery.shapes import shape_from_config

    editor = PlanEditor(shape_from_config(make_model("llama").config.to_dict()))
    editor.toggle_layer(2)
    with pytest.raises(PlanError, match="is dropped"):
        editor.toggle_group(2, 0)
    assert json.loads(editor.plan().to_json())["steps"] == [{"layers": [2], "op": "drop_layers"}]


async def test_session_marks_survive_reopen_and_undo_crosses_restarts(tiny_dir, tmp_path):
    from sessions import Session, describe_source

    model = describe_source(tiny_dir)
    session, _ = Session.open_or_create("tui", model, root=tmp_path / "home")
    app = WorkbenchApp(tiny_dir, load_weights=False, session=session)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        assert app.edit(lambda e: e.toggle_group(0, 1))
        assert app.edit(lambda e: e.toggle_mlp(2))
        app.set_theme("workbench-light")
    session.close()

    session = Session.open("tui", root=tmp_path / "home")
    app = WorkbenchApp(tiny_dir, load_weights=False, session=session)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        assert app.theme == "workbench-light"
        assert app.editor.layers[0].heads == {2, 3} and app.editor.layers[2].drop_mlp
        await pilot.press("u")  # undoes the MLP drop made before the restart
        assert not app.editor.layers[2].drop_mlp and app.editor.layers[0].heads == {2, 3}
    session.close()
    assert [s.op for s in Session.open("tui", root=tmp_path / "home", readonly=True).plan().steps] == ["prune_heads"]


async def test_jobs_panel_lists_jobs_started_elsewhere_with_their_loss_curve(tiny_dir, tmp_path, monkeypatch):
    from surgery.jobs.events import EventLog
    from surgery.jobs.store import create_job
    from workbench.screens.jobs import JobsScreen, loss_series

    monkeypatch.setenv("WORKBENCH_JOBS", str(tmp_path / "jobs"))
    job = create_job(tmp_path / "jobs", '{"version": 1}')  # as if `workbench distill` had started it
    log = EventLog(job.path / "events.jsonl")
    for step in range(1, 6):
        log.append("step", step=step, losses={"kl": 1.0 / step, "total": 2.0 / step}, tokens_per_s=100.0)
    app = WorkbenchApp(tiny_dir, load_weights=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        await pilot.press("j")
        await pilot.pause(0.5)
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, JobsScreen)
        assert app.screen.ids == [job.id]
        assert "losses" in str(app.screen.query_one("#curve").render())
    assert loss_series(list(map(lambda s: {"event": "step", "losses": {"kl": s}}, [3.0, 2.0]))) == {"kl": [3.0, 2.0]}


async def test_compare_screen_shows_original_and_plan_output(tiny_dir, tmp_path):
    from workbench.screens.compare import CompareScreen, headline_bars

    app = WorkbenchApp(tiny_dir, load_weights=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await opened(pilot, app)
        for layer in range(3):
            app.edit(lambda e, i=layer: e.toggle_group(i, 1))
        app.run_apply(str(tmp_path / "out"))
        await app.workers.wait_for_complete()
        app.push_screen(CompareScreen(app.compare_sources(), None, tmp_path / "evals"))
        await pilot.pause(0.5)
        await app.workers.wait_for_complete()
        await pilot.pause()
        table = app.screen.query_one("#compare")
        assert len(table.columns) == 3  # metric, original, pruned
        labels = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        assert "params" in labels
    text = headline_bars(["a", "b"], {"params": [100.0, 50.0]}, width=10)
    assert "██████████" in text and "█████ " in text


async def test_score_in_the_app_is_cached_in_the_session_and_reused(tiny_dir, tmp_path):
    from sessions import Session, describe_source
    from tiny_models import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / tiny_dir)  # scoring tokenizes text: give the model a tokenizer
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    session, _ = Session.open_or_create("sc", describe_source(tiny_dir), root=tmp_path / "home")
    app = WorkbenchApp(tiny_dir, load_weights=False, session=session)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        app.run_scoring({"data": str(text), "tokens": "256", "seq_len": "32", "methods": "head-grad,neuron-taylor"})
        for _ in range(200):
            await pilot.pause(0.05)
            if app.scores is not None:
                break
        assert app.scores is not None and app.metric_for("head") == "head_grad"
    session.close()
    assert len(list((tmp_path / "home" / "sc" / "scores").glob("*.safetensors"))) == 1
    session = Session.open("sc", root=tmp_path / "home")
    app = WorkbenchApp(tiny_dir, load_weights=False, session=session)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        await pilot.pause(0.2)
        assert app.scores is not None  # reused, not recomputed
    session.close()


async def test_pending_heads_scores_loaded_with_o_and_opened_plans_stay_in_the_session(tiny_dir, tmp_path):
    """Item by item from issue 16: a pending (GQA-illegal) head pick survives `q`; a score file loaded with `o` is
    kept in the session; a plan file opened in the TUI is one undoable edit."""
    from sessions import Session, describe_source
    from surgery.importance import ScoreFile, ScoreMeta, save_scores

    model = describe_source(tiny_dir)
    meta = ScoreMeta(methods=["head-grad"], model_source=tiny_dir, model_fingerprint=model.fingerprint,
                     library_version="test")
    heads = {f"model.layers.{i}.self_attn/head_grad": torch.tensor([4.0, 3.0, 2.0, 1.0]) for i in range(3)}
    save_scores(tmp_path / "elsewhere.safetensors", ScoreFile(meta, heads))
    plan_file = tmp_path / "suggested.json"
    plan_file.write_text(json.dumps({"version": 1, "steps": [{"op": "drop_layers", "layers": [1]}]}))
    session, _ = Session.open_or_create("p", model, root=tmp_path / "home")
    app = WorkbenchApp(tiny_dir, load_weights=False, session=session)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        assert app.open_plan_file(str(plan_file)) and app.editor.layers[1].dropped
        await pilot.press("u")  # the whole file in one undo
        assert not app.editor.layers[1].dropped
        app.edit(lambda e: e.toggle_head(0, 1))  # pending: group 1 would keep both
        app.read_scores(str(tmp_path / "elsewhere.safetensors"))
        await app.workers.wait_for_complete()
    session.close()
    kept = list((tmp_path / "home" / "p" / "scores").glob("*.safetensors"))
    assert len(kept) == 1
    session = Session.open("p", root=tmp_path / "home")
    app = WorkbenchApp(tiny_dir, load_weights=False, session=session)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        await pilot.pause(0.2)
        assert app.editor.pending == {0: {1}} and app.editor.layers[0].heads == set()
        assert app.scores is not None and app.scores.head(0, "head_grad") == [4.0, 3.0, 2.0, 1.0]
        await pilot.press("enter")  # layer 0: `k` adds the weakest head of every group: 1 (kept) and 3
        await pilot.press("k")
        await pilot.pause()
        assert app.editor.layers[0].heads == {1, 3} and app.editor.pending == {}
    session.close()


async def test_params_column_follows_the_plan_and_ranks_past_break_even_are_refused(tiny_dir):
    from workbench.editor import useful_rank
    from workbench.screens.model import ModelScreen

    app = WorkbenchApp(tiny_dir, load_weights=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        table = app.screen.query_one("#layers")
        full = str(table.get_row_at(0)[4])
        await pilot.press("space")  # drop layer 0
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, ModelScreen) and str(table.get_row_at(0)[4]) == "0" != full
        out_f, in_f = app.editor.linear_shape(1, "mlp.down_proj")  # 64 x 96: break-even 38
        assert not app.edit(lambda e: e.set_rank(1, "mlp.down_proj", useful_rank(out_f, in_f) + 1))
        await pilot.pause()
        assert any("break-even" in n.message for n in app._notifications)
        await pilot.press("down", "enter")
        app.screen.query_one("#linear").value = "mlp.down_proj"
        await pilot.pause()
        await pilot.press("left_square_bracket")  # from full rank straight to the largest rank that saves
        assert app.editor.layers[1].ranks == {"mlp.down_proj": useful_rank(out_f, in_f)}
        await pilot.press("right_square_bracket")  # past break-even again: back to full rank
        assert app.editor.layers[1].ranks == {}


async def test_tui_apply_records_the_fingerprint_the_cli_records(tiny_dir, tmp_path, capsys):
    from cli_helpers import call

    app = WorkbenchApp(tiny_dir, load_weights=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        app.edit(lambda e: e.toggle_group(0, 1))
        app.run_apply(str(tmp_path / "tui-out"))
        await app.workers.wait_for_complete()
        app.save_plan_file(str(tmp_path / "tui-plan.json"))
        await app.workers.wait_for_complete()
    # the TUI's plan file replays alone, and both outputs name the same input
    code, out, err = call(capsys, "apply", tmp_path / "tui-plan.json", "--out", tmp_path / "cli-out")
    assert code == 0, err
    tui = json.loads((tmp_path / "tui-out" / "surgery.json").read_text())["input"]
    cli = json.loads((tmp_path / "cli-out" / "surgery.json").read_text())["input"]
    assert tui["fingerprint"] == cli["fingerprint"] and tui["source"] == cli["source"]
