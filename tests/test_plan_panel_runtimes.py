"""The plan panel says which runtimes the plan's output runs on, and exports it (apply + export in a worker)."""

from __future__ import annotations

import json

from test_app import opened, tiny_dir  # noqa: F401 - the fixture is used by name
from workbench.app import WorkbenchApp
from workbench.screens.plan import PlanScreen


async def test_plan_panel_lists_runtimes_and_exports_for_vllm(tiny_dir, tmp_path):  # noqa: F811
    app = WorkbenchApp(tiny_dir, load_weights=False)
    async with app.run_test(size=(120, 30)) as pilot:
        await opened(pilot, app)
        assert app.edit(lambda e: e.toggle_group(1, 1))  # one layer loses a KV group: per-layer shapes
        await pilot.press("p")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, PlanScreen)
        text = str(app.screen.query_one("#plan-runtimes").render())
        assert "transformers: no" in text and "surgery.load" in text
        assert "vllm (+" in text and "params padding" in text  # zero heads for layer 1, zero neurons everywhere
        app.screen.run_export("vllm", str(tmp_path / "served"))
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert any("serve: vllm serve" in n.message for n in app._notifications), [n.message for n in app._notifications]
    config = json.loads((tmp_path / "served" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["block_configs"][1]["attention"]["n_heads_in_group"] == 4
