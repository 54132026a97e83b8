"""Export of the two newer axes, judged by the runtimes themselves: width cuts (prune_hidden) in llama.cpp (GGUF
llama / qwen3 / deci with a smaller embedding length) and in the vLLM DeciLM layout read by mlx-lm (zero-channel
padding where head_dim x heads cannot be the new hidden size), expert cuts (prune_experts) in llama.cpp (qwen3moe,
and llama with experts for Mixtral); what the runtimes cannot express is refused in one line, and the runtime
verdicts (surgery.export.runtimes) agree with the exporters.

Same yardstick as tests/test_export_gguf.py and tests/test_export_vllm.py: all-position f32 logits within 1e-3 of
surgery.load's and the same 32 greedy tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

import surgery
from llama_cpp_helpers import open_llama
from surgery.apply import apply_plan
from surgery.errors import UserError
from surgery.export import save_model_dir
from surgery.export.gguf import export_gguf, write_gguf
from surgery.export.runtimes import runtime_fits, shape_after
from surgery.export.vllm import export_vllm
from surgery.plan import parse_plan
from surgery.resolve import resolve_plan
from surgery.shapes import shape_from_config
from test_export_gguf import F32_ATOL, GREEDY, PROMPT, _run_llama, _run_torch
from test_prune_experts import SMALL
from tiny_models import make_model, tiny_tokenizer, tokens

WIDTH = {"op": "prune_hidden", "channels": [1, 5, 9, 33, 40, 63, 20, 11]}  # 64 -> 56 (4 heads divide it)
GGUF_WIDTH = {
    "llama": ("llama", [WIDTH]),
    "qwen3": ("qwen3", [WIDTH]),
    # per-layer heads and neurons on top of the narrower residual stream
    "deci": ("llama", [WIDTH, {"op": "prune_heads", "layer": 0, "heads": [0, 2]},
                       {"op": "prune_neurons", "layer": 1, "neurons": list(range(40))}]),
}


def _pruned_dir(tmp_path, family, steps, **config):
    pruned, _ = apply_plan(make_model(family, **config) if config else make_model(family),
                           parse_plan({"version": 1, "steps": steps}))
    return save_model_dir(pruned, tmp_path / "src", tokenizer=tiny_tokenizer(), manifest={"version": 1})


@pytest.mark.parametrize("case", list(GGUF_WIDTH))
def test_width_cut_runs_in_llama_cpp(tmp_path, case):
    family, steps = GGUF_WIDTH[case]
    directory = _pruned_dir(tmp_path, family, steps)
    report = export_gguf(str(directory), tmp_path / "w.gguf", dtype="f32")
    assert report.architecture == ("deci" if case == "deci" else family)
    assert int(_gguf_metadata(tmp_path / "w.gguf")[f"{report.architecture}.embedding_length"]) == 56
    _assert_llama_cpp_matches(directory, tmp_path / "w.gguf")


def _gguf_metadata(path) -> dict:
    llm = open_llama(path, vocab_only=True, logits_all=False)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


def _assert_llama_cpp_matches(directory, path) -> None:
    """llama.cpp's logits on `path` within 1e-3 of surgery.load(directory)'s everywhere, same greedy tokens."""
    want, want_next = _run_torch(surgery.load(str(directory), dtype="float32"), PROMPT, GREEDY)
    got, got_next = _run_llama(path, PROMPT, GREEDY)
    assert np.abs(want).max() > 1.0  # logits that are not near-constant: a wrong tensor would show
    assert np.abs(got - want).max() <= F32_ATOL
    assert got_next == want_next


VLLM_CONFIG = dict(intermediate_size=512, num_hidden_layers=4, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 1e5})
VLLM_WIDTH = {
    "width": ([WIDTH], 64),  # 56 is no multiple of head_dim 16: padded back to 4 heads x 16
    # 40 channels and 2 heads per layer: 48 = 3 x 16 holds them (partial padding; 3 global heads, zero heads too)
    "width_and_heads": ([{"op": "prune_hidden", "channels": list(range(0, 48, 2))}]
                        + [{"op": "prune_heads", "layer": i, "heads": [0, 3]} for i in range(4)], 48),
}


@pytest.mark.parametrize("case", list(VLLM_WIDTH))
def test_width_cut_in_the_vllm_layout_reads_exactly_in_mlx_lm(tmp_path, case):
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    from safetensors import safe_open

    steps, padded = VLLM_WIDTH[case]
    directory = _pruned_dir(tmp_path, "llama", steps, **VLLM_CONFIG)
    report = export_vllm(str(directory), tmp_path / "v", dtype="float32")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    source_cfg = json.loads((directory / "config.json").read_text())
    assert config["hidden_size"] == padded and config["head_dim"] == 16
    assert config["rms_norm_eps"] == pytest.approx(source_cfg["rms_norm_eps"] * source_cfg["hidden_size"] / padded)
    (hidden_pad,) = [a for a in report.adjustments if a.what.startswith("hidden size")]
    assert f"hidden size {source_cfg['hidden_size']} padded to {padded}" in hidden_pad.what
    # the reported cost is what the file really holds beyond the source (counted here from the tensors)
    with safe_open(str(tmp_path / "v" / "model.safetensors"), "pt") as f:
        written = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    model = surgery.load(str(directory), dtype="float32")
    assert written - sum(p.numel() for p in model.parameters()) == report.params_added
    mlx_model, _ = mlx_lm.load(str(tmp_path / "v"), tokenizer_config={"trust_remote_code": True})
    ids = tokens(2, 40)
    with torch.no_grad():
        want = model(ids).logits.numpy()
    got = np.array(mlx_model(mx.array(ids.numpy())))
    assert np.abs(want).max() > 1
    assert np.abs(got - want).max() <= 1e-3
    from test_export_vllm import _greedy_mlx, _greedy_torch

    assert _greedy_mlx(mlx_model, ids[:1, :6], GREEDY) == _greedy_torch(model, ids[:1, :6], GREEDY)


def moe(family: str, *, seed: int = 0, **extra):
    """A tiny random MoE (6 experts, top-2) as released checkpoints configure them (Qwen3-MoE: norm_topk_prob)."""
    if family == "qwen3_moe":
        cfg = Qwen3MoeConfig(**SMALL, intermediate_size=96, moe_intermediate_size=32, num_experts=6,
                             **{"norm_topk_prob": True, **extra})
    else:
        cfg = MixtralConfig(**SMALL, intermediate_size=32, num_local_experts=6, **extra)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


EXPERT_CUT = [{"op": "prune_experts", "layer": 0, "experts": [1, 4]},
              {"op": "prune_experts", "layer": 1, "experts": [0, 5]}]


@pytest.mark.parametrize(("family", "arch"), [("qwen3_moe", "qwen3moe"), ("mixtral", "llama")])
def test_expert_cut_runs_in_llama_cpp(tmp_path, family, arch):
    pruned, _ = apply_plan(moe(family), parse_plan({"version": 1, "steps": EXPERT_CUT}))
    directory = save_model_dir(pruned, tmp_path / "src", tokenizer=tiny_tokenizer(), manifest={"version": 1})
    report = export_gguf(str(directory), tmp_path / "m.gguf", dtype="f32")
    assert report.architecture == arch
    meta = _gguf_metadata(tmp_path / "m.gguf")
    assert (int(meta[f"{arch}.expert_count"]), int(meta[f"{arch}.expert_used_count"])) == (4, 2)
    _assert_llama_cpp_matches(directory, tmp_path / "m.gguf")


def _refusals():
    per_layer_experts, _ = apply_plan(moe("mixtral"), parse_plan({"version": 1, "steps": [
        {"op": "prune_experts", "layer": 0, "experts": [4, 5]}]}))  # layer 0 keeps 4 experts, layer 1 all 6
    heads_on_moe, _ = apply_plan(moe("qwen3_moe"), parse_plan({"version": 1, "steps": [
        *EXPERT_CUT, {"op": "prune_heads", "layer": 0, "heads": [0, 2]}]}))
    width_qwen2, _ = apply_plan(make_model("qwen2"), parse_plan({"version": 1, "steps": [WIDTH]}))
    return {
        "one expert count for every layer; uniform plans export": per_layer_experts,
        "norm_topk_prob false": moe("qwen3_moe", norm_topk_prob=False),
        "needs an MoE block in every layer": moe("qwen3_moe", mlp_only_layers=[1]),
        "deci, has no experts": heads_on_moe,
        "every query head and the hidden size": width_qwen2,
    }


def test_what_llama_cpp_cannot_express_is_refused_in_one_line(tmp_path):
    for needle, model in _refusals().items():
        with pytest.raises(UserError, match=needle) as err:
            write_gguf(model, tiny_tokenizer(), tmp_path / "x.gguf")
        assert "\n" not in str(err.value)
        assert not (tmp_path / "x.gguf").exists()


def test_vllm_export_of_an_moe_model_is_refused(tmp_path):
    directory = save_model_dir(moe("mixtral"), tmp_path / "src", tokenizer=tiny_tokenizer(), manifest={"version": 1})
    with pytest.raises(UserError, match="DeciLM layout has no experts"):
        export_vllm(str(directory), tmp_path / "v")
    assert not (tmp_path / "v").exists()


def _fits(config_dict, steps):
    resolution = resolve_plan(parse_plan({"version": 1, "steps": steps}), shape_from_config(config_dict))
    return {f.runtime: f for f in runtime_fits(shape_after(resolution), config_dict)}


def test_runtime_verdicts_follow_the_exporters(tmp_path):
    # width: plain transformers and llama.cpp run it as it is; vLLM pads exactly what the exporter pads
    cfg = make_model("llama", **VLLM_CONFIG).config.to_dict()
    fits = _fits(cfg, [WIDTH])
    assert fits["transformers"].runs and fits["llama.cpp"].runs and not fits["llama.cpp"].adjustments
    directory = _pruned_dir(tmp_path, "llama", [WIDTH], **VLLM_CONFIG)
    assert fits["vllm"].params_added == export_vllm(str(directory), tmp_path / "v").params_added > 0
    qwen2 = _fits(make_model("qwen2").config.to_dict(), [WIDTH])
    assert not qwen2["llama.cpp"].runs and "full hidden size" in qwen2["llama.cpp"].why_not
    # experts: uniform counts run in transformers and llama.cpp, never in the DeciLM layout
    for family in ("qwen3_moe", "mixtral"):
        moe_fits = _fits(moe(family).config.to_dict(), EXPERT_CUT)
        assert moe_fits["transformers"].runs and moe_fits["llama.cpp"].runs and not moe_fits["llama.cpp"].adjustments
        assert not moe_fits["vllm"].runs and "no experts" in moe_fits["vllm"].why_not
    per_layer = _fits(moe("mixtral").config.to_dict(), EXPERT_CUT[:1])  # layer 0 keeps 4 experts, layer 1 keeps 6
    assert per_layer["transformers"].why_not == "per-layer expert counts" and not per_layer["llama.cpp"].runs
    unnormalised = _fits(moe("qwen3_moe", norm_topk_prob=False).config.to_dict(), EXPERT_CUT)
    assert not unnormalised["llama.cpp"].runs and "norm_topk_prob" in unnormalised["llama.cpp"].why_not
