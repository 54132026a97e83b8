"""Every structural op on every family against the oracle: the masked original model gives the same logits."""

from __future__ import annotations

import copy

import pytest
import torch

from surgery.apply import apply_plan
from surgery.mask import masked
from surgery.plan import parse_plan
from surgery.resolve import resolve_plan
from surgery.shapes import shape_from_config
from tiny_models import FAMILIES, make_model, tokens

ATOL = 1e-4


def _layers(model, family):
    return model.transformer.h if family == "gpt2" else model.model.layers


def _down(family: str, layer: int) -> str:
    return f"transformer.h.{layer}.mlp.c_proj" if family == "gpt2" else f"model.layers.{layer}.mlp.down_proj"


def _q(family: str, layer: int) -> str:
    names = {"gpt2": f"transformer.h.{layer}.attn.c_attn", "phi3": f"model.layers.{layer}.self_attn.qkv_proj"}
    return names.get(family, f"model.layers.{layer}.self_attn.q_proj")


def _gate_or_up(family: str, layer: int) -> str:
    names = {"gpt2": f"transformer.h.{layer}.mlp.c_fc", "phi3": f"model.layers.{layer}.mlp.gate_up_proj"}
    return names.get(family, f"model.layers.{layer}.mlp.up_proj")


def _cases(family: str) -> dict[str, list[dict]]:
    # 4 query heads; 2 KV groups of 2 heads (GPT-2: 4 groups of 1 head)
    heads = [1, 2] if family == "gpt2" else [0, 3]  # one head from each group (legal)
    return {
        "prune_heads": [{"op": "prune_heads", "layer": 1, "heads": heads}],
        "prune_kv_groups": [{"op": "prune_kv_groups", "layer": 0, "groups": [1]}],
        "prune_neurons": [{"op": "prune_neurons", "layer": 2, "neurons": list(range(0, 96, 3))}],
        "drop_layers": [{"op": "drop_layers", "layers": [1]}],
        "drop_attention": [{"op": "drop_attention", "layer": 0}],
        "drop_mlp": [{"op": "drop_mlp", "layer": 2}],
        "low_rank_down": [{"op": "low_rank", "module": _down(family, 1), "rank": 8}],
        "low_rank_fused_in": [{"op": "low_rank", "module": _gate_or_up(family, 0), "rank": 12}],
        "low_rank_q": [{"op": "low_rank", "module": _q(family, 2), "rank": 10}],
        "combined": [
            {"op": "low_rank", "module": _down(family, 2), "rank": 16},
            {"op": "prune_neurons", "layer": 2, "neurons": [5, 17, 40, 95]},
            {"op": "prune_heads", "layer": 2, "heads": heads},
            {"op": "drop_layers", "layers": [0]},
            {"op": "drop_mlp", "layer": 1},
            {"op": "low_rank", "module": _q(family, 2), "rank": 20},
        ],
    }


CASES = [(f, c) for f in FAMILIES for c in _cases(f)]


@pytest.mark.parametrize("family,case", CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_pruned_model_matches_masked_original(family, case):
    x = tokens()
    original = make_model(family)
    with torch.no_grad():
        before = original(x).logits
    plan = parse_plan({"version": 1, "steps": _cases(family)[case]})
    resolution = resolve_plan(plan, shape_from_config(original.config.to_dict()))
    with torch.no_grad(), masked(original, resolution):
        expected = original(x).logits
    pruned, _ = apply_plan(copy.deepcopy(original), plan)
    with torch.no_grad():
        got = pruned(x).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # the cut must matter, or the comparison above proves nothing
    assert (got - before).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_plan_reproduces_logits_exactly(family):
    x = tokens()
    model = make_model(family)
    with torch.no_grad():
        before = model(x).logits
        pruned, _ = apply_plan(model, parse_plan({"version": 1, "steps": []}))
        assert torch.equal(pruned(x).logits, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_low_rank_leaves_model_unchanged(family):
    x = tokens()
    model = make_model(family)
    with torch.no_grad():
        before = model(x).logits
    plan = parse_plan({"version": 1, "steps": [{"op": "low_rank", "module": _down(family, 1), "rank": 64}]})
    pruned, _ = apply_plan(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, before, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_drops_by_the_removed_rows(family):
    model = make_model(family)
    n_before = sum(p.numel() for p in model.parameters())
    plan = parse_plan({"version": 1, "steps": [{"op": "prune_neurons", "layer": 0, "neurons": list(range(10))}]})
    pruned, _ = apply_plan(model, plan)
    # gated MLPs lose 3 vectors of width 64 per neuron (gate, up, down); GPT-2 loses 2 plus the c_fc bias entry
    per_neuron = {"gpt2": 2 * 64 + 1}.get(family, 3 * 64)
    assert n_before - sum(p.numel() for p in pruned.parameters()) == 10 * per_neuron


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_cache_matches_without_after_dropping_first_attention(family):
    """A skipped attention must still keep the KV cache's length right (layer 0 is what the cache reads)."""
    plan = parse_plan(
        {"version": 1, "steps": [{"op": "drop_attention", "layer": 0}, {"op": "drop_layers", "layers": [1]}]}
    )
    pruned, _ = apply_plan(make_model(family), plan)
    prompt = tokens(batch=1, length=6)
    with torch.no_grad():
        cached = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
