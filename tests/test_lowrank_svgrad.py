"""Rank choice from singular-value gradients (`plan suggest --rank-metric sv-grad`), against a brute-force reference.

The estimate of a rank-r truncation is sum_{i > r} |sigma_i * dL/dsigma_i|. The allocation must remove at least
the budget, and no choice of ranks that removes at least as many parameters may have a lower summed estimate:
checked by enumerating every combination of ranks on a few tiny matrices.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from cli_helpers import call, one_error_line
from surgery.errors import UserError
from surgery.estimate import estimate
from surgery.importance import ScoreFile, ScoreMeta
from surgery.importance.layout import model_layout, weight_out_in
from surgery.importance.ranks import gradient_ranks
from surgery.plan import parse_plan
from surgery.resolve import resolve_plan
from surgery.shapes import shape_from_config
from surgery.suggest import Target, suggest_plan
from tiny_models import make_model, save_tiny

FP = "sha256:" + "a" * 64


def sv_scores(model, seed: int = 0, flat: str | None = None) -> ScoreFile:
    """Random sv (descending) and signed sv_grad of the right sizes for every decoder Linear, plus neuron scores;
    `flat`: Linears whose name ends so get zero gradients (dropping their singular values is estimated free)."""
    g = torch.Generator().manual_seed(seed)
    layout = model_layout(model)
    tensors = {}
    for site in layout.layers:
        tensors[f"{site.mlp_path}/neuron_taylor"] = torch.rand(site.width, generator=g)
        for path, module in site.linears.items():
            n = min(weight_out_in(module, layout.conv1d).shape)
            tensors[f"{path}/sv"] = torch.rand(n, generator=g).sort(descending=True).values * 5
            grad = torch.randn(n, generator=g)
            tensors[f"{path}/sv_grad"] = grad * 0 if flat and path.endswith(flat) else grad
    meta = ScoreMeta(methods=["sv", "sv-grad", "neuron-taylor"], model_source="tiny", model_fingerprint=FP,
                     data_fingerprint="sha256:" + "b" * 64, tokens=64, library_version="0.1.0")
    return ScoreFile(meta, tensors)


def brute_force(matrices: list[tuple[int, int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(saved, estimate) of every combination of ranks (full rank included) of the given (out, in, |sv*grad|)."""
    per = []
    for out_f, in_f, est in matrices:
        n = len(est)
        ranks = [r for r in range(1, n) if r * (out_f + in_f) < out_f * in_f]
        per.append([(0, 0.0)] + [(out_f * in_f - r * (out_f + in_f), float(est[r:].sum())) for r in ranks])
    saved = np.zeros(1)
    cost = np.zeros(1)
    for options in per:
        s = np.array([o[0] for o in options], dtype=float)
        c = np.array([o[1] for o in options])
        saved = (saved[:, None] + s[None, :]).ravel()
        cost = (cost[:, None] + c[None, :]).ravel()
    return saved, cost


def test_allocation_meets_the_budget_and_no_choice_saving_as_much_is_cheaper():
    model = make_model("llama")
    layout = model_layout(model)
    scores = sv_scores(model)
    sites, names = layout.layers[:2], ("k_proj", "o_proj")  # 4 matrices: 64 x 64 (o) and 32 x 64 (k)

    def spectrum(path, size):
        return scores.get(path, "sv"), scores.get(path, "sv_grad")

    chosen = [(p, m) for s in sites for p, m in s.linears.items() if p.endswith(names)]
    matrices = []
    for path, module in chosen:
        out_f, in_f = weight_out_in(module, False).shape
        sv, grad = (scores.get(path, m).numpy().astype(np.float64) for m in ("sv", "sv_grad"))
        matrices.append((out_f, in_f, np.abs(sv * grad)))
    saved, cost = brute_force(matrices)
    for budget in (500, 3000, 6000, 9000):
        choice = gradient_ranks(layout, sites, names, budget, spectrum)
        assert choice.removed >= budget
        # the estimate of each chosen rank, from the definition
        for (path, _), (out_f, in_f, est) in zip(chosen, matrices):
            if path in choice.ranks:
                assert choice.estimate[path] == pytest.approx(float(est[choice.ranks[path]:].sum()), rel=1e-9)
            else:
                assert path in choice.spared
        total = sum(choice.estimate.values())
        assert choice.removed == sum(o * i - choice.ranks[p] * (o + i) for (p, _), (o, i, _) in zip(chosen, matrices)
                                     if p in choice.ranks)
        at_least = saved >= choice.removed
        assert total <= cost[at_least].min() + 1e-9, budget  # optimal for what it removes
        assert choice.removed < budget + max(o * i for o, i, _ in matrices)  # overshoots by less than one matrix


def test_a_matrix_whose_singular_values_are_free_to_drop_goes_first():
    model = make_model("llama")
    layout = model_layout(model)
    scores = sv_scores(model, flat="layers.1.self_attn.q_proj")
    choice = gradient_ranks(layout, layout.layers, ("attn",), 1000,
                            lambda p, n: (scores.get(p, "sv"), scores.get(p, "sv_grad")))
    assert list(choice.ranks) == ["model.layers.1.self_attn.q_proj"] and choice.estimate[
        "model.layers.1.self_attn.q_proj"] == 0.0
    assert choice.ranks["model.layers.1.self_attn.q_proj"] == 1  # free all the way down: one hull segment


def test_suggest_meets_the_target_with_low_rank_alone_or_a_rank_budget():
    model = make_model("llama")
    cfg = model.config.to_dict()
    scores = sv_scores(model, seed=3)
    shape = shape_from_config(cfg)
    s = suggest_plan(scores, cfg, Target(params=0.85, low_rank=("attn", "mlp")), metrics={"ranks": "sv-grad"},
                     uniform=False)
    e = estimate(cfg, resolve_plan(parse_plan(json.loads(s.plan.to_json())), shape))
    assert e.params_after == s.params_after <= s.target_params  # low rank alone: at or below the target
    assert s.target_params - s.params_after < s.granularity  # by less than the last hull segment taken
    assert all(step.op == "low_rank" for step in s.plan.steps) and s.summary["low_rank_choice"]["chosen"] > 0
    # a budget for attention's low rank, the MLP pruned to the rest of the target
    s = suggest_plan(scores, cfg, Target(params=0.8, low_rank=("attn",), rank_params=0.6), uniform=False)
    c = s.summary["low_rank_choice"]
    attn = sum(weight_out_in(m, False).numel() for site in model_layout(model).layers
               for p, m in site.linears.items() if ".self_attn." in p)
    assert c["budget"] == round(attn * 0.4) <= c["removed"]
    assert abs(s.params_after - s.target_params) <= s.granularity
    assert {step.op for step in s.plan.steps} == {"low_rank", "prune_neurons"}
    with pytest.raises(UserError, match="--rank-keep is an energy fraction"):
        suggest_plan(scores, cfg, Target(params=0.8, low_rank=("attn",), rank_keep=0.9), metrics={"ranks": "sv_grad"})
    with pytest.raises(UserError, match="at most"):
        suggest_plan(scores, cfg, Target(params=0.2, low_rank=("o_proj",)), metrics={"ranks": "sv_grad"})


def test_cli_prints_what_it_chose_and_refuses_bad_input(tmp_path, capsys):
    tiny = save_tiny(tmp_path / "model", "llama")
    data = tmp_path / "calib.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    scores = tmp_path / "s.safetensors"
    code, _, err = call(capsys, "score", tiny, "--data", data, "--out", scores, "--tokens", 256, "--seq-len", 64,
                        "--method", "sv,sv-grad,neuron-taylor")
    assert code == 0, err
    plan = tmp_path / "plan.json"
    code, out, err = call(capsys, "plan", "suggest", tiny, "--scores", scores, "--target-params", 0.7,
                          "--non-uniform", "--low-rank", "attn", "--rank-metric", "sv-grad", "--rank-params", 0.5,
                          "--out", plan)
    assert code == 0, err
    assert "low rank by sv-grad:" in out and "least sensitive:" in out
    assert any(s["op"] == "low_rank" for s in json.loads(plan.read_text())["steps"])
    for bad, says in ((["--rank-params", 1.5], "--rank-params 1.5"),
                      (["--rank-keep", 0.9], "--rank-keep is an energy fraction"),
                      (["--rank-params", 0.5, "--rank-metric", "sv"], "--rank-params is a budget")):
        argv = ["plan", "suggest", tiny, "--scores", scores, "--target-params", 0.7, "--non-uniform",
                "--low-rank", "attn", *(["--rank-metric", "sv-grad"] if "--rank-metric" not in bad else []), *bad,
                "--out", tmp_path / "bad.json"]
        code, _, err = call(capsys, *argv)
        assert code == 2 and says in one_error_line(err), err
    assert not (tmp_path / "bad.json").exists()


def test_brute_force_reference_enumerates_every_combination():
    """The reference itself: a 3 x 8 matrix saves 13 at rank 1 (estimate 1 + 0.5) and 2 at rank 2 (0.5)."""
    options = [(0, 0.0), (13, 1.5), (2, 0.5)]
    saved, cost = brute_force([(3, 8, np.array([3.0, 1.0, 0.5]))] * 2)
    expected = sorted((a[0] + b[0], a[1] + b[1]) for a, b in itertools.product(options, options))
    assert sorted(zip(saved.tolist(), cost.tolist())) == expected
