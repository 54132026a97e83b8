"""`plan suggest --axes`: a parameter target met along heads, neurons, layers, residual width and MoE experts by
score removed per parameter; exact as the estimate counts it, the output applies and loads, the cheaper axis wins."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cli_helpers import call, one_error_line
from surgery.apply import apply_plan
from surgery.errors import UserError
from surgery.estimate import estimate
from surgery.importance import ScoreFile, ScoreMeta, save_scores, score_model
from surgery.importance.axes import parse_axes
from surgery.plan import parse_plan
from surgery.resolve import resolve_plan
from surgery.shapes import shape_from_config
from surgery.suggest import Target, suggest_plan
from test_prune_experts import moe_model
from tiny_models import make_model, save_tiny, tokens

BLOCKS = tokens(batch=4, length=12, seed=5)
BATCHES = [BLOCKS[:2], BLOCKS[2:]]
DENSE = "head-grad,neuron-taylor,layer-grad,layer-ablate,layer-bi,channel-taylor,channel-norm"
OPS = {"heads": {"prune_heads", "prune_kv_groups"}, "neurons": {"prune_neurons"}, "layers": {"drop_layers"},
       "hidden": {"prune_hidden"}, "experts": {"prune_experts"}}


def scored(model, methods: str) -> ScoreFile:
    meta = ScoreMeta(methods=methods.split(","), model_source="tiny", model_fingerprint="sha256:" + "a" * 64,
                     tokens=BLOCKS.numel(), seq_len=BLOCKS.shape[1], batch_size=2, library_version="0.1.0")
    return ScoreFile(meta, score_model(model, BATCHES, methods))


@pytest.fixture(scope="module")
def llama_scores():
    return scored(make_model("llama"), DENSE)


def check_exact(s, cfg) -> None:
    """The plan survives a file round trip, the estimate gives the suggestion's counts, and the target is met
    within the filler's step as the estimate counts it."""
    resolution = resolve_plan(parse_plan(json.loads(s.plan.to_json())), shape_from_config(cfg))
    e = estimate(cfg, resolution)
    assert (e.params_before, e.params_after) == (s.params_before, s.params_after)
    assert 0 < s.granularity and abs(s.params_after - s.target_params) <= s.granularity, (s.params_after,
                                                                                          s.target_params)


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "non-uniform"])
@pytest.mark.parametrize("axes", ["hidden", "layers", "heads", "neurons", "heads,neurons,layers,hidden"])
def test_the_target_is_met_as_the_estimate_counts_it(llama_scores, axes, uniform):
    cfg = make_model("llama").config.to_dict()
    for kept in (0.85, 0.78):  # heads alone reach 75.6% at most (every layer keeps one head)
        s = suggest_plan(llama_scores, cfg, Target(params=kept, axes=parse_axes(axes)), uniform=uniform)
        check_exact(s, cfg)
        ops = {st.op for st in s.plan.steps}
        assert ops <= set().union(*(OPS[a] for a in axes.split(","))), ops
        report = s.summary["axes"]
        assert set(report) <= set(axes.split(",")) and sum(r["fills"] for r in report.values()) == 1
        if "," not in axes:
            assert report[axes]["params"] == s.params_before - s.params_after  # one axis: it removes it all
        if axes == "hidden":  # the kept width is one the Llama config can express (4 heads divide it)
            assert (64 - s.summary["hidden_removed"]) % 4 == 0 and s.summary["hidden_removed"] > 0


def test_mixed_plan_applies_and_loads(tmp_path, capsys):
    src = save_tiny(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    cfg = model.config.to_dict()
    s = suggest_plan(scored(model, DENSE), cfg, Target(params=0.7, axes=parse_axes("heads,neurons,layers,hidden")))
    plan_file = tmp_path / "plan.json"
    s.plan.save(plan_file)
    capsys.readouterr()
    code, _, err = call(capsys, "apply", plan_file, "--model", src, "--out", tmp_path / "out")
    assert code == 0, err
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # uniform: plain transformers
    assert sum(p.numel() for p in loaded.parameters()) == s.params_after
    with torch.no_grad():
        in_memory, _ = apply_plan(AutoModelForCausalLM.from_pretrained(src).eval(), s.plan)
        torch.testing.assert_close(loaded(BLOCKS).logits, in_memory(BLOCKS).logits, atol=1e-5, rtol=1e-5)


def constructed(model, cheap: str) -> ScoreFile:
    """Gate scores where the `cheap` metric is 1e-4 of every other one: that axis is clearly cheaper."""
    real = scored(model, "head-grad,neuron-taylor,layer-grad,channel-taylor")
    tensors = {k: torch.full_like(v, 1e-4 if k.endswith(cheap) else 1.0) + 1e-6 * torch.rand_like(v)
               for k, v in real.tensors.items()}
    return ScoreFile(real.meta, tensors)


@pytest.mark.parametrize("cheap, axis, kept", [("channel_taylor", "hidden", 0.8), ("layer_grad", "layers", 0.69),
                                               ("neuron_taylor", "neurons", 0.8)])
def test_a_clearly_cheaper_axis_is_chosen(cheap, axis, kept):
    model = make_model("llama")
    cfg = model.config.to_dict()
    s = suggest_plan(constructed(model, cheap), cfg, Target(params=kept, axes=parse_axes("heads,neurons,layers,hidden")))
    check_exact(s, cfg)
    report = s.summary["axes"]
    removed = s.params_before - s.params_after
    # the cheap axis takes the bulk; another axis only as the filler making up what its coarser steps cannot
    assert report[axis]["params"] >= 0.9 * removed, report
    assert all(r["params"] == 0 for a, r in report.items() if a != axis and not r["fills"]), report
    others = [r for a, r in report.items() if a != axis]
    assert report[axis]["score_per_m_params"] < min(r["cheapest_per_m_params"] for r in others)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_experts_axis_on_moe_models(family):
    model = moe_model(family, experts=8)
    cfg = model.config.to_dict()
    scores = scored(model, "head-grad,layer-grad,expert-grad,expert-reap")
    for axes in ("experts", "heads,layers,experts"):
        s = suggest_plan(scores, cfg, Target(params=0.75, axes=parse_axes(axes)))
        check_exact(s, cfg)
        kept = {st.layer: 8 - len(st.experts) for st in s.plan.steps if st.op == "prune_experts"}
        assert kept and len(set(kept.values())) == 1 and min(kept.values()) >= 2  # one count, never below top-k
        for st in s.plan.steps:  # each layer loses its lowest-scored experts
            if st.op == "prune_experts":
                order = torch.argsort(scores.tensors[f"model.layers.{st.layer}.mlp/expert_grad"], stable=True)
                assert sorted(st.experts) == sorted(order[: len(st.experts)].tolist())
        pruned, _ = apply_plan(moe_model(family, experts=8), s.plan)
        assert sum(p.numel() for p in pruned.parameters()) == s.params_after
        assert torch.isfinite(pruned(BLOCKS).logits).all()
    # REAP alone (a magnitude) may cut experts on its own axis
    s = suggest_plan(scores, cfg, Target(params=0.75, axes=("experts",)), metrics={"experts": "expert-reap"})
    assert s.plan.provenance["metrics"] == {"experts": "expert_reap"}


def test_bad_axes_are_one_clear_error(llama_scores):
    cfg = make_model("llama").config.to_dict()
    with pytest.raises(UserError, match="axes for this model: heads, neurons, layers, hidden$"):
        suggest_plan(llama_scores, cfg, Target(params=0.8, axes=("experts",)))
    gpt2 = make_model("gpt2")
    with pytest.raises(UserError, match="cannot be cut along it; axes for this model: heads, neurons, layers$"):
        suggest_plan(scored(gpt2, "head-grad,neuron-taylor"), gpt2.config.to_dict(),
                     Target(params=0.8, axes=("hidden",)))
    with pytest.raises(UserError, match="expected a comma-separated subset of heads, neurons, layers, hidden, experts"):
        parse_axes("width")
    # magnitudes have no exchange rate between axes: refused in a mix, fine alone
    with pytest.raises(UserError, match="channel_norm \\(hidden\\) is a magnitude"):
        suggest_plan(llama_scores, cfg, Target(params=0.8, axes=("layers", "hidden")), metrics={"hidden": "channel-norm"})
    s = suggest_plan(llama_scores, cfg, Target(params=0.8, axes=("hidden",)), metrics={"hidden": "channel-norm"})
    assert s.plan.provenance["metrics"] == {"hidden": "channel_norm"}
    with pytest.raises(UserError, match="can remove 24,576 parameters at most \\(75.6% kept\\)"):
        suggest_plan(llama_scores, cfg, Target(params=0.7, axes=("heads",)), uniform=False)
    with pytest.raises(UserError, match="--axes needs --target-params"):
        suggest_plan(llama_scores, cfg, Target(axes=("hidden",)))


def test_loss_unit_scores_mix_with_gate_sums_per_batch(llama_scores):
    """layer_ablate (mean-loss units) next to gate sums over 2 batches: the sums are halved, not compared raw."""
    cfg = make_model("llama").config.to_dict()
    s = suggest_plan(llama_scores, cfg, Target(params=0.8, axes=("neurons", "layers")),
                     metrics={"layers": "layer-ablate"})
    check_exact(s, cfg)
    report = s.summary["axes"]
    assert report["layers"]["metric"] == "layer_ablate" and report["neurons"]["metric"] == "neuron_taylor"
    raw = llama_scores.tensors["model/layer_ablate"].double()
    cheapest_layer = float((raw / torch.tensor([float(p) for p in _layer_params(cfg)])).min()) * 1e6
    assert report["layers"]["cheapest_per_m_params"] == pytest.approx(cheapest_layer, rel=1e-6)
    one = llama_scores.tensors["model.layers.0.mlp/neuron_taylor"].double()
    assert report["neurons"]["cheapest_per_m_params"] <= float(one.min()) / 2 / 1e-6  # halved: 2 batches


def _layer_params(cfg) -> list[int]:
    model = make_model("llama")
    return [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]


def test_cli_axes_prints_the_choice_and_refuses_bad_input(tmp_path, capsys):
    from surgery.pipeline import source_fingerprint
    from surgery.sources import resolve_source

    src = save_tiny(tmp_path / "src")
    base = scored(make_model("llama"), DENSE)  # the weights save_tiny wrote (same seed)
    meta = base.meta.model_copy(update={"model_source": str(src),
                                        "model_fingerprint": source_fingerprint(resolve_source(str(src)))})
    scores_path = save_scores(tmp_path / "s.safetensors", ScoreFile(meta, base.tensors))
    capsys.readouterr()
    code, out, err = call(capsys, "plan", "suggest", "--scores", scores_path, "--target-params", "0.8",
                          "--axes", "hidden,neurons", "--out", tmp_path / "plan.json")
    assert code == 0, err
    assert "axes (lowest score removed per parameter first):" in out and "hidden:" in out and "neurons:" in out
    assert "residual channels" in out
    code, out, err = call(capsys, "plan", "suggest", "--scores", scores_path, "--target-params", "0.8",
                          "--axes", "experts", "--out", tmp_path / "bad.json")
    assert code == 2 and "axes for this model: heads, neurons, layers, hidden" in one_error_line(err)
    code, out, err = call(capsys, "plan", "suggest", "--scores", scores_path, "--target-params", "0.8",
                          "--axes", "hidden", "--heads", "1", "--out", tmp_path / "bad.json")
    assert code == 2 and "--heads" in one_error_line(err)
    assert not (tmp_path / "bad.json").exists()


# -- measured loss curves (`--axes ... --data`) ------------------------------------------------------------------
CALIB = [tokens(batch=4, length=16, seed=7)]  # calibration batch, not BLOCKS (the scores')
MEASURED = "head-grad,neuron-taylor,layer-bi,channel-norm"


def _loss_with(plan_steps, family="llama") -> float:
    from surgery.importance.measured import calibration_loss

    model, _ = apply_plan(make_model(family), parse_plan({"version": 1, "steps": plan_steps}))
    return calibration_loss(model, CALIB)


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "non-uniform"])
def test_measured_mix_is_never_worse_than_a_single_axis_plan(uniform):
    """The kept plan's calibration loss, recomputed on a fresh model, is at most that of every single-axis plan
    cut to the same target by its own ranking (computed here independently), and the target is met."""
    from surgery.importance.measured import calibration_loss, suggest_measured

    model, cfg = make_model("llama"), make_model("llama").config.to_dict()
    scores = scored(model, MEASURED)
    target = Target(params=0.8, axes=parse_axes("heads,neurons,layers,hidden"))
    s = suggest_measured(model, CALIB, scores, cfg, target, uniform=uniform, points=(0.5, 1.0))
    check_exact(s, cfg)
    m = s.summary["measured"]
    kept_loss = _loss_with([st.model_dump(exclude_none=True) for st in s.plan.steps])
    assert m["base_loss"] == pytest.approx(calibration_loss(make_model("llama"), CALIB), abs=1e-5)
    singles = {  # each unit alone at the whole target, by the ranking the allocator uses for it
        "heads+neurons": suggest_plan(scores, cfg, Target(params=0.8), uniform=uniform),
        "layers": suggest_plan(scores, cfg, Target(params=0.8, axes=("layers",)), uniform=uniform,
                               metrics={"layers": "layer_bi"}),
        "hidden": suggest_plan(scores, cfg, Target(params=0.8, axes=("hidden",)), uniform=uniform,
                               metrics={"hidden": "channel_norm"}),
    }
    close = lambda x: abs(x.params_after - x.target_params) <= min(x.granularity, 0.02 * x.params_before)  # noqa: E731
    losses = {u: _loss_with([st.model_dump(exclude_none=True) for st in x.plan.steps]) for u, x in singles.items()
              if close(x)}
    assert losses and kept_loss <= min(losses.values()) + 1e-5, (kept_loss, losses, m)
    assert m["best_single"] == min(losses, key=losses.get)
    kept = m["mix_loss"] if m["kept"] == "mix" else m["best_single_loss"]
    assert kept_loss == pytest.approx(m["base_loss"] + kept, abs=1e-5)  # the summary reports what it measured
    if m["mix_loss"] is not None:  # the check kept the better of the two
        assert (m["kept"] == "mix") == (m["mix_loss"] <= m["best_single_loss"])
    report = s.summary["axes"]
    assert set(report) == {"heads+neurons", "layers", "hidden"} and sum(r["fills"] for r in report.values()) <= 1
    assert all(r["curve"][0] == [0, 0.0] and len(r["curve"]) >= 2 for r in report.values())
    assert s.plan.provenance["allocation"]["kept"] == m["kept"]


def test_allocation_on_curves_is_optimal_for_convex_curves():
    """Against a brute force over a fine grid of splits of the goal (the curves linear between their points)."""
    from surgery.importance.measured import allocate_on_curves, interpolate

    curves = {"a": [(0, 0), (10, 1), (20, 4), (30, 9)], "b": [(0, 0), (15, 0.6), (30, 3.0)],
              "c": [(0, 0), (5, 1.0), (40, 2.0)]}  # c is concave: its hull is the chord (0,0)-(40,2)
    goal = 36.0
    got = allocate_on_curves(curves, goal)
    assert sum(got.values()) == pytest.approx(goal)
    hull_cost = lambda u, x: interpolate([curves[u][0], *[p for p in curves[u] if p != (5, 1.0)]], x)  # noqa: E731
    cost = sum(hull_cost(u, x) for u, x in got.items())
    best = min(hull_cost("a", a) + hull_cost("b", b) + hull_cost("c", goal - a - b)
               for a in [i * 0.5 for i in range(61)] for b in [i * 0.5 for i in range(61)] if a + b <= goal)
    assert cost <= best + 1e-9
    with pytest.raises(UserError, match="at most by their measured cuts"):
        allocate_on_curves(curves, 200.0)


def test_measured_bad_input_is_one_clear_error(tmp_path, capsys):
    from surgery.importance.measured import suggest_measured

    model, cfg = make_model("llama"), make_model("llama").config.to_dict()
    scores = scored(model, "head-grad,neuron-taylor")
    for target, kw, needle in (
        (Target(axes=("hidden",)), {}, "--axes needs --target-params"),
        (Target(params=0.8, axes=("hidden",)), {"points": (0.5, 2.0)}, "expected fractions of the cut"),
        (Target(params=0.8, axes=("hidden", "layers"), serve="vllm"), {}, "--serve vllm is not supported"),
        (Target(params=0.8, axes=("layers", "hidden")), {}, "no layers ranking .*--method layer-bi"),
    ):
        with pytest.raises(UserError, match=needle):
            suggest_measured(model, CALIB, scores, cfg, target, **kw)
    # through the CLI: a missing --data file is one line, exit 2, no plan written
    src = save_tiny(tmp_path / "src")
    base = scored(make_model("llama"), MEASURED)
    from surgery.pipeline import source_fingerprint
    from surgery.sources import resolve_source

    meta = base.meta.model_copy(update={"model_source": str(src),
                                        "model_fingerprint": source_fingerprint(resolve_source(str(src)))})
    scores_path = save_scores(tmp_path / "s.safetensors", ScoreFile(meta, base.tensors))
    capsys.readouterr()
    code, _, err = call(capsys, "plan", "suggest", "--scores", scores_path, "--target-params", "0.8", "--axes",
                        "hidden,layers", "--data", tmp_path / "missing.txt", "--out", tmp_path / "bad.json")
    assert code == 2 and "missing.txt" in one_error_line(err)
    assert not (tmp_path / "bad.json").exists()
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    code, out, err = call(capsys, "plan", "suggest", "--scores", scores_path, "--target-params", "0.8", "--axes",
                          "hidden,layers", "--data", text, "--calib-tokens", "256", "--seq-len", "32",
                          "--out", tmp_path / "plan.json")
    assert code == 0, err
    assert "axes by measured calibration loss" in out and "checked: " in out and "kept " in out
    assert json.loads((tmp_path / "plan.json").read_text())["provenance"]["allocation"]["data"]["tokens"] == 256


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_non_uniform_expert_counts_per_layer_match_the_masked_router_and_load(tmp_path, capsys, family):
    """--non-uniform gives each MoE layer its own expert count (layer 0's experts are made the cheap ones); the
    plan equals the masked-router original and loads with surgery.load."""
    import surgery
    from test_prune_experts import apply_with_cli, pruned_against_oracle

    model = moe_model(family)  # 6 experts, top-2: what pruned_against_oracle builds
    cfg = model.config.to_dict()
    real = scored(model, "expert-grad")
    tensors = {k: v.abs() + (1e-4 if ".layers.0." in k else 1.0) for k, v in real.tensors.items()}
    mlp = model.model.layers[0].mlp
    per_expert = sum(p.numel() for p in [*mlp.experts.parameters(recurse=False),
                                         *mlp.gate.parameters(recurse=False)]) / 6
    total = sum(p.numel() for p in model.parameters())
    target = Target(params=1 - 5 * per_expert / total, axes=("experts",))  # 5 experts: 4 (the most) + 1
    s = suggest_plan(ScoreFile(real.meta, tensors), cfg, target, uniform=False)
    check_exact(s, cfg)
    removed = {st.layer: st.experts for st in s.plan.steps if st.op == "prune_experts"}
    assert {k: len(v) for k, v in removed.items()} == {0: 4, 1: 1}  # per-layer counts, never below top-k
    assert s.summary["experts_removed"] == {0: 4, 1: 1}
    pruned_against_oracle(family, removed)  # asserts the masked-router logits
    apply_with_cli(tmp_path, capsys, family, json.loads(s.plan.to_json()))
    loaded = surgery.load(str(tmp_path / "out"))
    assert [layer.mlp.gate.num_experts for layer in loaded.model.layers] == [2, 5]
    expected, _ = apply_plan(moe_model(family), s.plan)
    with torch.no_grad():
        torch.testing.assert_close(loaded(BLOCKS).logits, expected(BLOCKS).logits, atol=1e-5, rtol=0)
