"""The TUI's width view and expert grid (issue 18) and its recovery entries (issue 14), through Pilot on tiny
models: marked channels / experts become prune_hidden / prune_experts steps, illegal ones are refused with the
resolver's one-line reason, a reconstruct step is added from a form, and a compress job starts from the jobs form."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from test_app import opened
from test_jobs import env, one_thread  # noqa: F401 (fixtures)
from test_prune_experts import moe_model
from tiny_models import make_model, tiny_tokenizer
from workbench.app import WorkbenchApp
from workbench.screens.layer import LayerScreen
from workbench.screens.width import WidthScreen, width_step
from workbench.widgets.expert_grid import ExpertGrid


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
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "hidden 64 → 60" in str(app.screen.query_one("#shape-info").render())
        estimate = app.totals.estimate  # the meta-model estimate of the plan: 4 of 64 channels everywhere
        assert 0.9 * estimate.params_before < estimate.params_after < estimate.params_before
        app.mark_lowest("channels", 0.25)  # `L channels 25%`: 16 channels, a multiple of the 4 heads
        assert steps_of(app, "prune_hidden")[0]["channels"] == list(range(48, 64))
    assert width_step(576, 9, True) == 9 and width_step(2048, 32, True) == 32 and width_step(64, 4, False) == 1


async def test_expert_grid_marks_go_to_the_plan_per_layer_and_top_k_is_kept(tiny_moe):
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
        await pilot.press("right", "space")  # expert 1 of layer 0 alone: per-layer counts (surgery.load) are legal
        await pilot.pause()
        assert steps_of(app, "prune_experts") == [{"op": "prune_experts", "layer": 0, "experts": [1]}]
        assert "×e1" in str(grid.render())
        await pilot.press("escape", "down", "enter")  # layer 1: one expert there too
        await pilot.pause()
        grid = app.screen.query_one(ExpertGrid)
        grid.focus()
        await pilot.press("space")
        await pilot.pause()
        assert steps_of(app, "prune_experts") == [{"op": "prune_experts", "layer": 0, "experts": [1]},
                                                  {"op": "prune_experts", "layer": 1, "experts": [0]}]
        assert "×e0" in str(grid.render())
        assert app.mark_lowest_experts(4)  # 6 - 4 = 2 = top-k: allowed; the lowest REAP scores go
        assert steps_of(app, "prune_experts") == [{"op": "prune_experts", "layer": 0, "experts": [2, 3, 4, 5]},
                                                  {"op": "prune_experts", "layer": 1, "experts": [2, 3, 4, 5]}]
        assert not app.mark_lowest_experts(5)  # one expert left: below the router's top-k
        await pilot.pause()
        refusal = [n.message for n in app._notifications if n.title == "refused"][-1]
        assert "fewer than the router's top-k (2): remove at most 4" in refusal
        app.mark_lowest("experts", 0.5)  # `L experts 50%`: 3 of 6 in every MoE layer
        assert steps_of(app, "prune_experts")[1] == {"op": "prune_experts", "layer": 1, "experts": [3, 4, 5]}
        await pilot.press("escape")
        await pilot.pause()
        table = app.screen.query_one("#layers")
        assert str(table.get_row_at(0)[4]) == "3/6"  # the experts column


async def test_width_and_expert_steps_survive_reopening_a_session_and_undo_takes_the_newest_edit(tiny_llama, tmp_path):
    from sessions import Session, describe_source

    session, _ = Session.open_or_create("w", describe_source(tiny_llama), root=tmp_path / "home")
    app = WorkbenchApp(tiny_llama, load_weights=False, session=session)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        assert app.edit(lambda e: e.toggle_group(0, 1))  # a mark the session journals
        assert app.edit(lambda e: e.set_hidden([60, 61, 62, 63]))  # kept in its UI state
        assert app.edit(lambda e: e.toggle_mlp(2))
        await pilot.press("u")  # the newest edit: the MLP drop, through the journal
        assert not app.editor.layers[2].drop_mlp and app.editor.hidden == [60, 61, 62, 63]
        await pilot.press("u")  # then the width cut, from the editor's own history
        assert app.editor.hidden == [] and app.editor.layers[0].heads == {2, 3}
        await pilot.press("U")
        assert app.editor.hidden == [60, 61, 62, 63]
    session.close()
    session = Session.open("w", root=tmp_path / "home")
    app = WorkbenchApp(tiny_llama, load_weights=False, session=session)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        assert app.editor.hidden == [60, 61, 62, 63] and app.editor.layers[0].heads == {2, 3}
        assert [s.op for s in app.editor.plan().steps] == ["prune_heads", "prune_hidden"]
        session.set_ui("plan_extras", json.dumps({"steps": [{"op": "prune_hidden", "channels": [1, 2, 3]}]}))
    session.close()
    session = Session.open("w", root=tmp_path / "home")  # UI state that no longer fits: said, not applied
    app = WorkbenchApp(tiny_llama, load_weights=False, session=session)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        assert app.editor.hidden == [] and app.editor.layers[0].heads == {2, 3}
        assert any("were left out" in n.message and "cannot be expressed" in n.message for n in app._notifications)
    session.close()


async def test_channel_and_expert_scores_are_computed_in_a_worker_when_the_file_lacks_them(tiny_moe, tmp_path):
    from surgery.data import load_blocks
    from surgery.importance.width import expert_scores
    from surgery.loading import load_model

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    app = WorkbenchApp(tiny_moe, load_weights=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        assert app.scores is None
        app.run_width_scores({"data": str(text), "tokens": "256", "seq_len": "32"})
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.scores is not None
        assert app.metric_for("channel") is None  # prune_hidden does not cut MoE families: not scored
        assert app.metric_for("expert") == "expert_reap"
        got_reap, got_freq = app.scores.expert(1, "expert_reap"), app.scores.expert(0, "expert_freq")
    loaded = load_model(tiny_moe)
    batches = list(load_blocks(str(text), loaded.tokenizer, 32, 256).batches(8))
    reference = expert_scores(loaded.model, batches)
    assert got_reap == pytest.approx(reference[1]["reap"].tolist())
    assert got_freq == pytest.approx(reference[0]["frequency"].tolist()) and sum(got_freq) == pytest.approx(2.0)


async def test_reconstruct_step_added_from_the_plan_panel_form(tiny_llama, tmp_path):
    from workbench.screens.plan import PlanScreen, ReconstructFormScreen

    tiny_tokenizer().save_pretrained(tmp_path / tiny_llama)
    text = tmp_path / "calib.txt"
    text.write_text("Pack my box with five dozen liquor jugs. " * 60)
    app = WorkbenchApp(tiny_llama, load_weights=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot, app)
        assert app.edit(lambda e: e.set_neurons(1, list(range(40))))
        await pilot.press("p", "r")
        await pilot.pause()
        assert isinstance(app.screen, ReconstructFormScreen)
        assert app.screen.values()["inputs"] == "original" and app.screen.values()["ridge"] == "0.1"
        app.screen.dismiss({"data": str(text), "tokens": "1024", "seq_len": "64", "ridge": "-1", "inputs": "original"})
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert any("reconstruct form" in n.message and "greater than or equal to 0" in n.message
                   for n in app._notifications)
        assert steps_of(app, "reconstruct") == []
        app.run_reconstruct({"data": str(text), "tokens": "1024", "seq_len": "64", "ridge": "0.5",
                             "inputs": "pruned"})
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert steps_of(app, "reconstruct") == [{"op": "reconstruct", "inputs": "pruned", "ridge": 0.5, "layers": None}]
        plan = app.editor.plan()
        assert plan.calibration.source == str(text) and plan.calibration.tokens == 1024
        assert plan.calibration.fingerprint.startswith("sha256:") and plan.calibration.seq_len == 64
        assert isinstance(app.screen, PlanScreen)
        assert "reconstruct" in str(app.screen.query_one("#ops").children[-1].children[0].render())
        assert app.edit(lambda e: e.toggle_layer(0))  # a later mark keeps the step and its data
        assert steps_of(app, "reconstruct") and app.editor.plan().calibration is not None
        await pilot.press("u", "u")  # the layer drop, then the reconstruct step
        assert steps_of(app, "reconstruct") == [] and app.editor.plan().calibration is None
        app.run_width_scores({"data": str(text), "tokens": "512", "seq_len": "64"})  # a dense family: channels
        await app.workers.wait_for_complete()
        await pilot.pause()
        channels = app.scores.channel("channel_norm")
        assert len(channels) == 64 and min(channels) > 0 and app.metric_for("expert") is None


@pytest.mark.slow
async def test_compress_recipe_starts_from_the_jobs_form_and_runs_in_the_background(env, tmp_path, monkeypatch,
                                                                                    one_thread):
    """A real detached process: the row shows its phase while it runs and done with the final perplexity."""
    import asyncio

    from surgery.jobs.status import job_status
    from surgery.jobs.store import find_job
    from workbench.screens.jobs import CompressFormScreen, JobsScreen

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKBENCH_JOBS", str(tmp_path / "jobs"))
    fields = {"source": str(env / "teacher"), "target_params": "0.8", "data": str(env / "data.txt"),
              "tokens": "10", "out": str(tmp_path / "compressed"), "eval_data": str(env / "data.txt"),
              "options": "seq_len=24 batch_size=2 calib_tokens=960 calib_seq_len=48 eval_tokens=240 eval_seq_len=24"}
    app = WorkbenchApp(str(env / "teacher"), load_weights=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await opened(pilot, app)
        await pilot.press("j")
        await pilot.pause()
        await pilot.press("r")
        await pilot.pause()
        assert isinstance(app.screen, CompressFormScreen) and app.screen.values()["target_params"] == "0.8"
        app.screen.dismiss(fields)  # 10 tokens: less than one redistillation step -> refused, nothing made
        await pilot.pause()
        assert isinstance(app.screen, JobsScreen)
        assert any("less than one redistillation step" in n.message for n in app._notifications)
        assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())
        app.screen.start_compress({**fields, "options": fields["options"] + " colour=red"})
        await pilot.pause()
        assert any("expected NAME=VALUE" in n.message for n in app._notifications)
        app.screen.start_compress({**fields, "tokens": "144"})
        await pilot.pause()
        jobs = [j for j in app.screen.ids if j.startswith("compress-")]
        assert len(jobs) == 1
        job = find_job(tmp_path / "jobs", jobs[0])
        states = set()
        for _ in range(1200):  # the recipe takes ~40 s on a busy 2-core machine
            st = job_status(job)
            states.add(st.state)
            if st.state not in ("created", "running"):
                break
            await asyncio.sleep(0.25)
        assert st.state == "done", (st.error, (job.path / "stderr.log").read_text()[-2000:])
        assert "running" in states and st.step == st.steps == 7 and st.output == str(tmp_path / "compressed")
        app.screen.poll()
        await app.workers.wait_for_complete()
        await pilot.pause()
        table = app.screen.query_one("#jobs")
        row = [str(c) for c in table.get_row_at(app.screen.ids.index(job.id))]
        assert row[1] == "done" and row[2] == "7/7" and "perplexity" in row[6]
        redistill = [j for j in app.screen.ids if j.startswith("distill-")]
        assert len(redistill) == 1  # the recipe's redistillation stage: a job of its own, with its loss curve
        table.move_cursor(row=app.screen.ids.index(job.id))
        app.screen.poll()
        await app.workers.wait_for_complete()
        await pilot.pause()
        panel = str(app.screen.query_one("#curve").render())  # the run's stages with their metrics, and its plan
        assert "base" in panel and "redistill" in panel and "perplexity" in panel and "plan.json" in panel
        await pilot.press("l")  # its plan as the marks, one undoable edit
        await pilot.pause()
        from collections import Counter

        want = Counter(s["op"] for s in json.loads((job.path / "plan.json").read_text())["steps"])
        assert Counter(s.op for s in app.editor.plan().steps) == want
    record = json.loads((tmp_path / "compressed" / "pipeline.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["prune", "redistill"]
    assert record["metrics"]["after"]["perplexity"] == pytest.approx(st.eval["perplexity"])
