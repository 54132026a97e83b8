"""Which runtimes run a shape (surgery.export.runtimes) and `plan suggest --serve`: its plans export with no padding."""

from __future__ import annotations

import pytest

from surgery.apply import apply_plan
from surgery.errors import UserError
from surgery.export import save_model_dir
from surgery.export.runtimes import runtime_fits, shape_after
from surgery.plan import parse_plan
from surgery.resolve import resolve_plan
from surgery.shapes import shape_from_config
from surgery.suggest import Target, suggest_plan
from test_suggest import synthetic_scores
from tiny_models import make_model, tiny_tokenizer

WIDE = dict(intermediate_size=512, num_hidden_layers=4)  # widths on vLLM's 256 grid are reachable


def _fits(cfg: dict, steps: list[dict]) -> dict:
    resolution = resolve_plan(parse_plan({"version": 1, "steps": steps}), shape_from_config(cfg))
    return {f.runtime: f for f in runtime_fits(shape_after(resolution), cfg)}


def test_runtime_verdicts_follow_the_shapes():
    cfg = make_model("llama", **WIDE).config.to_dict()
    uniform = _fits(cfg, [{"op": "prune_neurons", "layer": i, "neurons": list(range(256))} for i in range(4)])
    assert all(f.runs and not f.adjustments for f in uniform.values())
    mixed = _fits(cfg, [{"op": "prune_heads", "layer": 1, "heads": [0, 2]}, {"op": "drop_attention", "layer": 0},
                        {"op": "drop_mlp", "layer": 3}])
    assert not mixed["transformers"].runs and mixed["surgery.load"].runs
    assert [a.what for a in mixed["llama.cpp"].adjustments] == [
        "first layer without attention: one zero head", "layer 3: attention without MLP: a zero MLP of width 1"]
    assert mixed["vllm"].runs and "layer 1: 2 query heads" in mixed["vllm"].adjustments[0].what
    qwen3 = make_model("qwen3").config.to_dict()
    fits = _fits(qwen3, [{"op": "prune_neurons", "layer": 0, "neurons": [1]}])
    assert not fits["vllm"].runs and not fits["llama.cpp"].runs and fits["surgery.load"].runs


@pytest.fixture(scope="module")
def wide():
    model = make_model("llama", **WIDE)
    return model, model.config.to_dict(), synthetic_scores(model)


@pytest.mark.parametrize("serve", ["vllm", "llama.cpp"])
def test_serve_plans_export_without_padding(tmp_path, wide, serve):
    model, cfg, scores = wide
    s = suggest_plan(scores, cfg, Target(params=0.8, serve=serve), uniform=False)
    assert s.params_after / s.params_before < 0.85  # it did prune (two 256-neuron blocks for vLLM)
    pruned, resolution = apply_plan(make_model("llama", **WIDE), s.plan)
    shapes = resolution.result_shapes()
    if serve == "vllm":
        assert all(x.heads == 4 and x.mlp % 256 == 0 for x in shapes)
    else:
        assert len({(x.heads, x.mlp) for x in shapes}) > 1  # per-layer shapes: the point of `deci`
    save_model_dir(pruned, tmp_path / "pruned", tokenizer=tiny_tokenizer(), manifest={"version": 1})
    if serve == "vllm":
        from surgery.export.vllm import export_vllm

        report = export_vllm(str(tmp_path / "pruned"), tmp_path / "out", dtype="float32")
    else:
        gguf = pytest.importorskip("surgery.export.gguf")
        report = gguf.export_gguf(str(tmp_path / "pruned"), tmp_path / "out.gguf", dtype="f32")
    assert report.adjustments == []
    # without --serve the same target pads for vLLM: the constraint is what made the difference
    free = suggest_plan(scores, cfg, Target(params=0.8), uniform=False)
    assert resolve_plan(free.plan, shape_from_config(cfg)) and _fits(cfg, [st.model_dump(exclude_none=True) for st in
                                                                            free.plan.steps])["vllm"].adjustments


def test_serve_refusals_are_one_line(wide):
    _, cfg, scores = wide
    with pytest.raises(UserError, match="expected one of"):
        suggest_plan(scores, cfg, Target(params=0.8, serve="tgi"))
    with pytest.raises(UserError, match="--low-rank"):
        suggest_plan(scores, cfg, Target(low_rank=("mlp",), rank_keep=0.9, serve="vllm"))
    qwen2 = make_model("qwen2")
    with pytest.raises(UserError, match="no per-layer shapes"):
        suggest_plan(synthetic_scores(qwen2), qwen2.config.to_dict(), Target(params=0.8, serve="llama.cpp"),
                     uniform=False)


def test_llama_cpp_verdict_predicts_the_gguf_exporters_padding(tmp_path, wide):
    """The plan panel's llama.cpp line must announce the padding the GGUF export then adds (MLP widths off its grid,
    a zero MLP for attention-only layers), parameter for parameter."""
    gguf = pytest.importorskip("surgery.export.gguf")
    _, cfg, _ = wide
    steps = [{"op": "prune_neurons", "layer": 0, "neurons": list(range(13))},  # 499: off the 32 grid
             {"op": "prune_neurons", "layer": 1, "neurons": list(range(64))},  # 448: on it
             {"op": "drop_mlp", "layer": 2}]
    fit = _fits(cfg, steps)["llama.cpp"]
    assert fit.runs and fit.adjustments
    pruned, _ = apply_plan(make_model("llama", **WIDE), parse_plan({"version": 1, "steps": steps}))
    save_model_dir(pruned, tmp_path / "pruned", tokenizer=tiny_tokenizer(), manifest={"version": 1})
    report = gguf.export_gguf(str(tmp_path / "pruned"), tmp_path / "out.gguf", dtype="f32")
    assert sum(a.params_added for a in fit.adjustments) == report.params_added > 0
