"""`plan suggest`: every suggestion resolves, hits its target within one step, follows the scores and the GQA rule;
uniform suggestions load with plain transformers after apply."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery.errors import UserError
from surgery.importance import ScoreFile, ScoreMeta, ScoreMismatch, save_scores, score_model
from surgery.importance.allocate import head_states, hull_allocate
from surgery.importance.layout import model_layout, weight_out_in
from surgery.estimate import estimate
from surgery.plan import parse_plan
from surgery.resolve import resolve_plan
from surgery.shapes import shape_from_config
from surgery.suggest import Target, parse_amount, suggest_plan
from tiny_models import FAMILIES, make_model, tokens

FP = "sha256:" + "a" * 64


def synthetic_scores(model, seed=0) -> ScoreFile:
    """Random positive scores of the right shapes (head_grad, neuron_taylor, layer_bi)."""
    g = torch.Generator().manual_seed(seed)
    layout = model_layout(model)
    tensors = {f"{layout.model_path}/layer_bi": torch.rand(len(layout.layers), generator=g)}
    for s in layout.layers:
        tensors[f"{s.attn_path}/head_grad"] = torch.rand(s.heads, generator=g)
        tensors[f"{s.mlp_path}/neuron_taylor"] = torch.rand(s.width, generator=g)
    meta = ScoreMeta(methods=["head-grad", "neuron-taylor", "layer-bi"], model_source="tiny", model_fingerprint=FP,
                     data_fingerprint="sha256:" + "b" * 64, tokens=30, library_version="0.1.0")
    return ScoreFile(meta, tensors)


def neuron_step(config_dict) -> int:
    """Parameters removed by one neuron in every layer, measured by applying such a plan."""
    n = shape_from_config(config_dict).num_layers
    plan = parse_plan({"version": 1, "steps": [{"op": "prune_neurons", "layer": i, "neurons": [0]} for i in range(n)]})
    e = estimate(config_dict, resolve_plan(plan, shape_from_config(config_dict)))
    return e.params_before - e.params_after


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "non-uniform"])
@pytest.mark.parametrize("family", FAMILIES)
def test_params_target_gives_a_valid_plan_within_one_step(family, uniform):
    model = make_model(family)
    cfg = model.config.to_dict()
    shape = shape_from_config(cfg)
    step = neuron_step(cfg) // (1 if uniform else shape.num_layers)
    for kept in (0.9, 0.7):
        s = suggest_plan(synthetic_scores(model), cfg, Target(params=kept), uniform=uniform)
        resolution = resolve_plan(parse_plan(json.loads(s.plan.to_json())), shape)  # survives a file round trip
        e = estimate(cfg, resolution)
        before, after = e.params_before, e.params_after
        assert (before, after) == (s.params_before, s.params_after)
        assert abs(after - before * kept) <= step, (kept, after, before * kept, step)
        if kept < 0.8:
            assert any(c.heads for c in resolution.layers), "attention gives its share too"
        if uniform:
            assert len({(x.heads, x.kv_heads, x.mlp) for x in resolution.result_shapes()}) == 1


def test_component_amounts_follow_the_scores():
    model = make_model("llama")  # 3 layers, 4 query heads in 2 KV groups, 96 neurons
    scores = synthetic_scores(model, seed=1)
    cfg = model.config.to_dict()
    s = suggest_plan(scores, cfg, Target(neurons=parse_amount("25%", "neurons"), layers=parse_amount("1", "layers")))
    dropped = int(scores.tensors["model/layer_bi"].argmin())
    assert s.summary["layers_dropped"] == [dropped]
    by_layer = {st.layer: st for st in s.plan.steps if st.op == "prune_neurons"}
    assert dropped not in by_layer and len(by_layer) == 2
    total = sum(len(st.neurons) for st in by_layer.values())
    assert total == round(0.25 * 2 * 96)
    for layer, st in by_layer.items():  # uniform: each layer's own lowest-scored neurons
        expected = torch.argsort(scores.tensors[f"model.layers.{layer}.mlp/neuron_taylor"])[: len(st.neurons)]
        assert st.neurons == sorted(expected.tolist())
    heads = suggest_plan(scores, cfg, Target(heads=parse_amount("50%", "heads")))
    resolution = resolve_plan(heads.plan, shape_from_config(cfg))
    assert [len(c.kept_heads) for c in resolution.layers] == [2, 2, 2]


def test_head_states_respect_gqa_and_keep_the_best_heads():
    # group 0 holds the two worst heads: removing the two lowest-scored heads alone would break the GQA rule
    scores = torch.tensor([0.1, 0.2, 5.0, 0.3, 4.0, 6.0])  # 3 groups of 2
    states = head_states(scores, n_kv=3, head_cost=10, kv_cost=4)
    assert len(states) == 6  # (m, k) for m in 1..3, k in 1..2
    for st in states:
        kept = [h for h in range(6) if h not in st.removed]
        per_group = [sum(1 for h in kept if h // 2 == grp) for grp in range(3)]
        assert len({c for c in per_group if c}) == 1  # every kept group keeps the same number
        assert st.params == 10 * len(st.removed) + 4 * per_group.count(0)
    one_group = next(st for st in states if st.m == 2 and st.k == 2)
    assert one_group.removed == [0, 1]
    one_per_group = next(st for st in states if st.m == 3 and st.k == 1)
    assert one_per_group.removed == [0, 3, 4]


def test_hull_allocation_lands_near_the_budget():
    rng = random.Random(0)
    for _ in range(50):
        options = [[(0, 0.0)] + [(a, rng.random() * a) for a in sorted(rng.sample(range(1, 40), 4))]
                   for _ in range(5)]
        budget = rng.uniform(10, 100)
        picks = hull_allocate(options, budget)
        total = sum(options[i][p][0] for i, p in enumerate(picks))
        assert abs(total - budget) <= 40


def test_bad_targets_are_one_line_errors():
    model = make_model("llama")
    cfg, scores = model.config.to_dict(), synthetic_scores(model)
    with pytest.raises(UserError, match="nothing to adjust"):
        suggest_plan(scores, cfg, Target(params=0.8, heads=parse_amount("1", "heads"),
                                         neurons=parse_amount("1", "neurons")))
    with pytest.raises(UserError, match="neurons removed per layer"):
        suggest_plan(scores, cfg, Target(params=0.2))
    with pytest.raises(UserError, match="percentage"):
        parse_amount("lots", "heads")
    with pytest.raises(UserError, match="no head metric"):
        bare = ScoreFile(scores.meta, {k: v for k, v in scores.tensors.items() if "head" not in k})
        suggest_plan(bare, cfg, Target(params=0.8))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_model("llama").save_pretrained(path)
    return path


def test_uniform_suggestion_applies_and_loads_with_plain_transformers(capsys, tmp_path, model_dir):
    from surgery.mask import masked
    from surgery.pipeline import source_fingerprint
    from surgery.sources import resolve_source
    from workbench.cli import run

    model = make_model("llama")
    fingerprint = source_fingerprint(resolve_source(str(model_dir)))
    tensors = score_model(model, [tokens(2, 12), tokens(2, 12, seed=2)], "head-grad,neuron-taylor,layer-bi")
    meta = ScoreMeta(methods=["head-grad"], model_source=str(model_dir), model_fingerprint=fingerprint,
                     data_fingerprint="sha256:" + "b" * 64, tokens=48, library_version="0.1.0")
    scores_path = save_scores(tmp_path / "s.safetensors", ScoreFile(meta, tensors))
    plan_path = tmp_path / "plan.json"
    code = run(["plan", "suggest", "--scores", str(scores_path), "--target-params", "0.8", "--out", str(plan_path),
                "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    plan = json.loads(plan_path.read_text())
    assert plan["model"] == {"source": str(model_dir), "fingerprint": fingerprint}
    assert plan["provenance"]["scores"][0]["data_fingerprint"] == "sha256:" + "b" * 64
    assert plan["provenance"]["metrics"] == {"heads": "head_grad", "neurons": "neuron_taylor"}
    assert result["params_after"] < result["params_before"]
    out_dir = tmp_path / "pruned"
    code = run(["apply", str(plan_path), "--out", str(out_dir), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["output"]["loadable_with"] == "transformers"
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == result["params_after"]
    ids = tokens()
    with torch.no_grad(), masked(model, resolve_plan(parse_plan(plan), shape_from_config(model.config.to_dict()))):
        expected = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_suggest_refuses_scores_of_other_weights_unless_forced(capsys, tmp_path, model_dir):
    from workbench.cli import run

    scores = synthetic_scores(make_model("llama"))  # made for fingerprint "aaaa...", not this directory
    path = save_scores(tmp_path / "s.safetensors", scores)
    code = run(["plan", "suggest", str(model_dir), "--scores", str(path), "--target-params", "0.8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "computed for model" in err[0] and "--force" in err[0]
    code = run(["plan", "suggest", str(model_dir), "--scores", str(path), "--target-params", "0.8", "--force",
                "--non-uniform", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["plan"]["provenance"]["uniform"] is False
    other = save_scores(tmp_path / "t.safetensors", ScoreFile(
        scores.meta.model_copy(update={"data_fingerprint": "sha256:" + "c" * 64}), scores.tensors))
    with pytest.raises(ScoreMismatch, match="computed for data"):
        suggest_plan([scores, load(other)], make_model("llama").config.to_dict(), Target(params=0.8))


def load(path):
    from surgery.importance import load_scores

    return load_scores(path)


def test_default_metrics_follow_the_layout():
    model = make_model("llama")
    scores = synthetic_scores(model)
    layout = model_layout(model)
    for s in layout.layers:
        scores.tensors[f"{s.attn_path}/head_delta"] = torch.randn(s.heads)
        scores.tensors[f"{s.mlp_path}/neuron_delta"] = torch.randn(s.width)
    cfg = model.config.to_dict()
    uniform = suggest_plan(scores, cfg, Target(params=0.7))
    assert uniform.plan.provenance["metrics"] == {"heads": "head_delta", "neurons": "neuron_taylor"}
    per_layer = suggest_plan(scores, cfg, Target(params=0.7), uniform=False, metrics={"neurons": "neuron_delta"})
    assert per_layer.plan.provenance["metrics"] == {"heads": "head_grad", "neurons": "neuron_delta"}


# -- KV-group metric and low-rank suggestions ---------------------------------------------------------------------
def test_kv_metric_decides_which_groups_stay():
    model = make_model("llama")  # 4 query heads in 2 KV groups per layer
    cfg, scores = model.config.to_dict(), synthetic_scores(model)
    tensors = dict(scores.tensors)
    for i in range(3):
        tensors[f"model.layers.{i}.self_attn/head_grad"] = torch.tensor([1.0, 1.0, 2.0, 2.0])  # group 1 better
        tensors[f"model.layers.{i}.self_attn/kv_group_grad"] = torch.tensor([10.0, 1.0])  # group 0 better
    scores = ScoreFile(scores.meta, tensors)
    three = Target(heads=parse_amount("75%", "heads"))  # 3 of 4 heads per layer: keep one group, one head
    by_heads = resolve_plan(suggest_plan(scores, cfg, three).plan, shape_from_config(cfg))
    assert all(c.kept_heads in ([2], [3]) for c in by_heads.layers)
    s = suggest_plan(scores, cfg, three, metrics={"heads": "head_grad", "kv": "kv-group-grad"})
    by_groups = resolve_plan(s.plan, shape_from_config(cfg))
    assert all(c.kept_heads in ([0], [1]) for c in by_groups.layers)
    assert s.plan.provenance["metrics"]["kv"] == "kv_group_grad"
    with pytest.raises(UserError, match="no 'kv_group_grad'"):
        suggest_plan(synthetic_scores(model), cfg, three, metrics={"kv": "kv_group_grad"})


def spectra_scores(model, seed=0) -> ScoreFile:
    """Synthetic head/neuron/layer scores plus the model's real sv and sv_act (on random tokens)."""
    base = synthetic_scores(model, seed)
    real = score_model(model, [tokens(2, 12)], "sv,sv-act")
    return ScoreFile(base.meta, {**base.tensors, **real})


def smallest_rank(values: torch.Tensor, keep: float) -> int:
    """Reference: walk the descending squared values until `keep` of their sum is reached."""
    energy = sorted((float(v) ** 2 for v in values), reverse=True)
    total, acc = sum(energy), 0.0
    for r, e in enumerate(energy, start=1):
        acc += e
        if acc >= keep * total:
            return r
    return len(energy)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_low_rank_suggestion_applies_with_the_estimated_params(family):
    import copy

    from surgery.apply import apply_plan
    from surgery.estimate import count_params

    model = make_model(family)
    cfg, scores = model.config.to_dict(), spectra_scores(model)
    layout = model_layout(model)
    s = suggest_plan(scores, cfg, Target(params=0.55, low_rank=("mlp",), rank_keep=0.5))
    ranks = {st.module: st.rank for st in s.plan.steps if st.op == "low_rank"}
    mlp_linears = {p: m for site in layout.layers for p, m in site.linears.items() if p.startswith(site.mlp_path)}
    assert ranks and set(ranks) | set(s.summary["low_rank_skipped"]) == set(mlp_linears)
    for path, rank in ranks.items():
        out_f, in_f = weight_out_in(mlp_linears[path], layout.conv1d).shape
        assert rank == smallest_rank(scores.tensors[f"{path}/sv"], 0.5)
        assert rank * (out_f + in_f) < out_f * in_f  # every step saves parameters
    assert not any(st.op == "prune_neurons" for st in s.plan.steps), "the factorised MLP is not pruned"
    assert any(st.op in ("prune_heads", "prune_kv_groups") for st in s.plan.steps), "heads fill the target"
    resolution = resolve_plan(parse_plan(json.loads(s.plan.to_json())), shape_from_config(cfg))
    assert not resolution.warnings
    pruned, _ = apply_plan(copy.deepcopy(model), s.plan)
    assert count_params(pruned) == s.params_after < s.params_before
    with torch.no_grad():
        assert torch.isfinite(pruned(tokens()).logits).all()
    if family == "gpt2":  # attention and MLP both have a c_proj: a layer-relative path picks one
        only = suggest_plan(scores, cfg, Target(low_rank=("mlp.c_proj",), rank_keep=0.3))
        assert {st.module for st in only.plan.steps} == {f"transformer.h.{i}.mlp.c_proj" for i in range(3)}


def test_low_rank_that_saves_nothing_is_omitted_and_bad_options_are_refused():
    model = make_model("llama")
    cfg, scores = model.config.to_dict(), spectra_scores(model)
    full = suggest_plan(scores, cfg, Target(low_rank=("down_proj",), rank_keep=0.999999))
    assert not full.plan.steps and full.params_after == full.params_before
    assert full.summary["low_rank_skipped"] == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    only = suggest_plan(scores, cfg, Target(low_rank=("down_proj",), rank_keep=0.3))
    assert {st.module for st in only.plan.steps} == {f"model.layers.{i}.mlp.down_proj" for i in range(3)}
    act = suggest_plan(scores, cfg, Target(low_rank=("down_proj",), rank_keep=0.3), metrics={"ranks": "sv-act"})
    assert act.plan.provenance["metrics"] == {"ranks": "sv_act"}
    for st in act.plan.steps:
        assert st.rank == smallest_rank(scores.tensors[f"{st.module}/sv_act"], 0.3)
    bad = [
        (Target(low_rank=("mlp",)), "go together"),
        (Target(low_rank=("mlp",), rank_keep=1.0), "in \\(0, 1\\)"),
        (Target(low_rank=("wq_proj",), rank_keep=0.5), "no such Linear"),
        (Target(low_rank=("attn",), rank_keep=0.5, heads=parse_amount("1", "heads")), "pick one for attention"),
        (Target(params=0.8, low_rank=("attn", "mlp"), rank_keep=0.5), "nothing to adjust"),
    ]
    for target, message in bad:
        with pytest.raises(UserError, match=message):
            suggest_plan(scores, cfg, target)
    with pytest.raises(UserError, match="no rank metric"):
        suggest_plan(synthetic_scores(model), cfg, Target(low_rank=("mlp",), rank_keep=0.5))


def test_cli_low_rank_options(capsys, tmp_path, model_dir):
    from cli_helpers import call, one_error_line
    from surgery.pipeline import source_fingerprint
    from surgery.sources import resolve_source

    fingerprint = source_fingerprint(resolve_source(str(model_dir)))
    base = spectra_scores(make_model("llama"))  # the weights model_dir holds
    tensors = base.tensors
    meta = base.meta.model_copy(update={"model_source": str(model_dir), "model_fingerprint": fingerprint})
    scores_path = save_scores(tmp_path / "s.safetensors", ScoreFile(meta, tensors))
    code, out, err = call(capsys, "plan", "suggest", "--scores", scores_path, "--low-rank", "mlp",
                          "--rank-keep", "0.5", "--kv-metric", "head-grad", "--heads", "1", "--json")
    assert code == 2 and "not a KV-group score" in one_error_line(err) and not out
    code, out, err = call(capsys, "plan", "suggest", "--scores", scores_path, "--low-rank", "down_proj",
                          "--rank-keep", "0.5", "--out", tmp_path / "plan.json", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [st["op"] for st in result["plan"]["steps"]] == ["low_rank"] * 3
    assert result["plan"]["provenance"]["metrics"] == {"ranks": "sv"}
    assert result["summary"]["low_rank"] == {st["module"]: st["rank"] for st in result["plan"]["steps"]}
    code, out, err = call(capsys, "plan", "suggest", "--scores", scores_path, "--low-rank", "mlp",
                          "--target-params", "0.9")
    assert code == 2 and "--rank-keep" in one_error_line(err)
