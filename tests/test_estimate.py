"""Before/after estimates (meta-device) agree with inspecting the checkpoint that apply really writes."""

from __future__ import annotations

import pytest

from surgery.apply import apply_plan
from surgery.estimate import estimate
from surgery.export import save_model_dir
from surgery.inspect import inspect_model
from surgery.plan import parse_plan
from surgery.resolve import resolve_plan
from surgery.shapes import shape_from_config
from tiny_models import FAMILIES, make_model


def _steps(family):
    heads = [1, 2] if family == "gpt2" else [0, 3]
    up = "transformer.h.0.mlp.c_fc" if family == "gpt2" else "model.layers.0.self_attn." + (
        "qkv_proj" if family == "phi3" else "q_proj")
    return [{"op": "prune_heads", "layer": 1, "heads": heads},
            {"op": "prune_neurons", "layer": 2, "neurons": list(range(20))},
            {"op": "drop_mlp", "layer": 1},
            {"op": "low_rank", "module": up, "rank": 8}]


@pytest.mark.parametrize("family", FAMILIES)
def test_estimate_matches_inspect_of_the_written_output(tmp_path, family):
    model = make_model(family)
    cfg = model.config.to_dict()
    plan = parse_plan({"version": 1, "steps": _steps(family)})
    est = estimate(cfg, resolve_plan(plan, shape_from_config(cfg)), context=64)
    model.save_pretrained(tmp_path / "before")
    before = inspect_model(tmp_path / "before", context=64)
    pruned, _ = apply_plan(model, plan)
    save_model_dir(pruned, tmp_path / "after")
    after = inspect_model(tmp_path / "after", context=64)
    assert (est.params_before, est.params_after) == (before.params_total, after.params_total)
    assert (est.flops_before, est.flops_after) == (before.flops_per_token, after.flops_per_token)
    assert est.speedup > 1
