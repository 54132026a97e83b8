"""prune_experts on tiny Qwen3-MoE and Mixtral models against the oracle: the original model whose router logits
of the removed experts are -inf before softmax and top-k (a forward hook) gives the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

from cli_helpers import call, one_error_line
from surgery.apply import apply_plan
from surgery.plan import parse_plan
from tiny_models import VOCAB, save_tiny, tiny_tokenizer, tokens

ATOL = 1e-4
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, num_experts_per_tok=2, initializer_range=0.3, max_position_embeddings=128)


def moe_model(family: str, seed: int = 0, experts: int = 6):
    if family == "qwen3_moe":
        cfg = Qwen3MoeConfig(**SMALL, intermediate_size=96, moe_intermediate_size=32, num_experts=experts,
                             norm_topk_prob=False)
    else:
        cfg = MixtralConfig(**SMALL, intermediate_size=32, num_local_experts=experts)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def masked_router(model, removed: dict[int, list[int]], normalise: bool):
    """Hooks that route as if the removed experts' logits were -inf (softmax, top-k, optional renormalising)."""
    handles = []
    for layer, gone in removed.items():
        router = model.model.layers[layer].mlp.gate

        def hook(module, args, out, gone=gone):
            logits = F.linear(args[0].reshape(-1, module.hidden_dim), module.weight)
            logits[:, gone] = float("-inf")
            probs = torch.softmax(logits.float(), -1)
            top, idx = torch.topk(probs, module.top_k, -1)
            if normalise:
                top = top / top.sum(-1, keepdim=True)
            return out[0], top.to(out[1].dtype), idx

        handles.append(router.register_forward_hook(hook))
    return handles


def _plan(removed):
    return parse_plan({"steps": [{"op": "prune_experts", "layer": k, "experts": v} for k, v in removed.items()]})


def pruned_against_oracle(family: str, removed: dict[int, list[int]]):
    """Apply the plan removing `removed`; assert it gives the masked original's logits; return the pruned model."""
    model, ids = moe_model(family), tokens()
    with torch.no_grad():
        full = model(ids).logits
        masked_router(model, removed, normalise=family == "mixtral")
        masked = model(ids).logits
        pruned, _ = apply_plan(moe_model(family), _plan(removed))
        got = pruned(ids).logits
    torch.testing.assert_close(got, masked, atol=ATOL, rtol=0)
    assert (got - full).abs().max() > 1e-2  # experts that were routed to are gone: the oracle can tell
    return pruned


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_prune_experts_matches_masked_original(family):
    pruned = pruned_against_oracle(family, {0: [1, 4, 5], 1: [0, 2, 3]})  # same count per layer: a plain config
    assert pruned.config.to_dict()["num_local_experts"] == 3 and "surgery_layers" not in pruned.config.to_dict()
    assert pruned.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 3


def test_uniform_expert_cut_loads_with_plain_transformers(tmp_path, capsys):
    src = tmp_path / "src"
    moe_model("qwen3_moe").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    plan = tmp_path / "plan.json"
    removed = {0: [1, 4], 1: [0, 2]}
    plan.write_text(_plan(removed).to_json())
    capsys.readouterr()
    code, _, err = call(capsys, "apply", plan, "--model", src, "--out", tmp_path / "out")
    assert code == 0, err
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ref = moe_model("qwen3_moe")
    masked_router(ref, removed, normalise=False)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens()).logits, ref(tokens()).logits, atol=ATOL, rtol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == 4


@pytest.mark.parametrize(("steps", "needle"), [
    ([{"op": "prune_experts", "layer": 0, "experts": [0, 1, 2, 3, 4]},
      {"op": "prune_experts", "layer": 1, "experts": [0, 1, 2, 3, 4]}],
     "would keep 1 of 6 experts, fewer than the router's top-k (2): remove at most 4"),
    ([{"op": "prune_experts", "layer": 0, "experts": [6]}], "expert 6 out of range (layer 0 has 6 experts)"),
    ([{"op": "prune_experts", "layer": 0, "experts": [0, 1, 2, 3, 4]}, {"op": "prune_experts", "layer": 1,
                                                                       "experts": [1]}],
     "layer 0 would keep 1 of 6 experts, fewer than the router's top-k (2)"),  # per-layer counts: top-k per layer
    ([{"op": "prune_neurons", "layer": 0, "neurons": [1]}], "is a mixture-of-experts block"),
])
def test_bad_prune_experts_is_one_line_exit_2(tmp_path, capsys, steps, needle):
    src = tmp_path / "src"
    moe_model("mixtral").save_pretrained(src)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "steps": steps}))
    capsys.readouterr()
    code, _, err = call(capsys, "apply", plan, "--model", src, "--out", tmp_path / "out")
    assert code == 2
    if len(steps) == 2 and steps[0]["experts"] == steps[1]["experts"]:  # the same problem in two layers: two lines
        assert all(line.startswith("error: ") for line in err.splitlines()) and err.count("top-k") == 2
    else:
        one_error_line(err)
    assert needle in err
    assert not (tmp_path / "out").exists()


def test_prune_experts_on_a_dense_model_is_refused(tmp_path, capsys):
    src = save_tiny(tmp_path / "src", "llama")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "steps": [{"op": "prune_experts", "layer": 0, "experts": [0]}]}))
    capsys.readouterr()
    code, _, err = call(capsys, "apply", plan, "--model", src, "--out", tmp_path / "out")
    assert code == 2
    assert "prune_experts needs a mixture-of-experts model; this llama model has no experts" in one_error_line(err)


def test_masked_router_hook_matches_the_model_when_nothing_is_masked():
    # the hook re-implements routing: with no expert masked it must reproduce the model exactly
    for family in ("qwen3_moe", "mixtral"):
        model, ids = moe_model(family), tokens()
        with torch.no_grad():
            full = model(ids).logits
            masked_router(model, {0: [], 1: []}, normalise=family == "mixtral")
            torch.testing.assert_close(model(ids).logits, full, atol=ATOL, rtol=0)


def test_dense_layers_of_qwen3_moe_are_not_experts_and_block_drop_layers():
    from surgery.errors import PlanError
    from surgery.resolve import resolve_plan
    from surgery.shapes import shape_from_config

    cfg = moe_model("qwen3_moe").config.to_dict()
    cfg["mlp_only_layers"] = [1]
    shape = shape_from_config(cfg)
    assert shape.experts == [6, 0] and shape.top_k == 2
    for steps, needle in (([{"op": "prune_experts", "layer": 1, "experts": [0]}], "layer 1 has a dense MLP"),
                          ([{"op": "drop_layers", "layers": [0]}], "drop_layers is not supported yet on MoE")):
        with pytest.raises(PlanError, match=needle):
            resolve_plan(parse_plan({"steps": steps}), shape)


def apply_with_cli(tmp_path, capsys, family: str, plan: dict) -> None:
    """`workbench apply` the plan to a saved tiny model of `family` into tmp_path / "out"."""
    src = tmp_path / "src"
    moe_model(family).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    capsys.readouterr()
    code, _, err = call(capsys, "apply", tmp_path / "plan.json", "--model", src, "--out", tmp_path / "out")
    assert code == 0, err


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_per_layer_heads_on_moe_load_with_surgery_load(tmp_path, capsys, family):
    # one layer loses heads: surgery_layers, so the checkpoint goes through surgery.load, which must fuse the
    # per-expert tensors save_pretrained wrote (Mixtral: block_sparse_moe.experts.E.w1/w2/w3)
    import surgery

    steps = [{"op": "prune_heads", "layer": 0, "heads": [0, 2]},
             {"op": "prune_experts", "layer": 0, "experts": [1]}, {"op": "prune_experts", "layer": 1, "experts": [4]}]
    apply_with_cli(tmp_path, capsys, family, {"version": 1, "steps": steps})
    assert "surgery_layers" in json.loads((tmp_path / "out" / "config.json").read_text())
    expected, _ = apply_plan(moe_model(family), parse_plan({"steps": steps}))
    with torch.no_grad():
        torch.testing.assert_close(surgery.load(str(tmp_path / "out"))(tokens()).logits, expected(tokens()).logits,
                                   atol=ATOL, rtol=0)


PER_LAYER = {0: [1, 4, 5], 1: [2]}  # layer 0 keeps 3 experts, layer 1 keeps 5: no plain config says that


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_per_layer_expert_counts_match_masked_original(family):
    pruned = pruned_against_oracle(family, PER_LAYER)
    mlps = [layer.mlp for layer in pruned.model.layers]
    assert [m.experts.gate_up_proj.shape[0] for m in mlps] == [3, 5]
    assert [(m.experts.num_experts, m.gate.num_experts, m.gate.weight.shape[0]) for m in mlps] == [(3, 3, 3), (5, 5, 5)]
    assert [e["experts"] for e in pruned.config.to_dict()["surgery_layers"]] == [3, 5]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_per_layer_expert_counts_save_and_load_with_surgery_load(tmp_path, capsys, family):
    import surgery

    apply_with_cli(tmp_path, capsys, family, json.loads(_plan(PER_LAYER).to_json()))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [e["experts"] for e in config["surgery_layers"]] == [3, 5] and "surgery.load" in config["surgery_load_with"]
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert manifest["output"]["loadable_with"] == "surgery"
    loaded = surgery.load(str(tmp_path / "out"))
    assert [layer.mlp.gate.num_experts for layer in loaded.model.layers] == [3, 5]
    expected, _ = apply_plan(moe_model(family), _plan(PER_LAYER))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()).logits, expected(tokens()).logits, atol=1e-5, rtol=0)
