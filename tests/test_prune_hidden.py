"""prune_hidden (width pruning) against an independent reference: a Llama/Qwen forward pass written here from the
definition, run on weights sliced here, plus "removing zero channels is exact"."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from cli_helpers import call, one_error_line
from surgery.apply import apply_plan
from surgery.plan import parse_plan
from surgery.stream import plan_blockers
from tiny_models import make_model, save_tiny, tokens

ATOL = 1e-4
REMOVED = [1, 5, 9, 33, 40, 63, 20, 11]  # 64 -> 56 channels: divisible by the 4 heads LlamaConfig needs


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta):
    # x: (B, heads, T, hd); rotate_half convention: pairs are (i, i + hd/2)
    hd, t = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos + half * sin


def reference_logits(sd: dict, cfg, ids: torch.Tensor) -> torch.Tensor:
    """Decoder forward from the definition: RMSNorm, GQA attention with RoPE (Qwen3's per-head q/k norms, Qwen2's
    q/k/v biases when the weights have them), SwiGLU MLP, final norm, lm_head (tied: the embedding)."""
    eps, theta = cfg.rms_norm_eps, cfg.rope_parameters["rope_theta"]
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    x = sd["model.embed_tokens.weight"][ids]
    b, t, _ = x.shape
    causal = torch.full((t, t), float("-inf")).triu(1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."

        def lin(name, h, p=p):
            return F.linear(h, sd[p + name + ".weight"], sd.get(p + name + ".bias"))

        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        q, k, v = (lin(f"self_attn.{n}_proj", h).view(b, t, -1, hd) for n in "qkv")
        if p + "self_attn.q_norm.weight" in sd:
            q, k = _rms(q, sd[p + "self_attn.q_norm.weight"], eps), _rms(k, sd[p + "self_attn.k_norm.weight"], eps)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        q, k = _rope(q, theta), _rope(k, theta)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, -1) @ v
        x = x + lin("self_attn.o_proj", att.transpose(1, 2).reshape(b, t, -1))
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        x = x + lin("mlp.down_proj", F.silu(lin("mlp.gate_proj", h)) * lin("mlp.up_proj", h))
    x = _rms(x, sd["model.norm.weight"], eps)
    return x @ sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).T


def sliced_state(sd: dict, keep: list[int], scale: float) -> dict:
    """The state dict with only residual channels `keep`, by tensor name (a second code path to surgery.ops)."""
    idx = torch.tensor(keep)
    out = {}
    for name, w in sd.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight") or name.endswith(
                tuple(f"{n}_proj.weight" for n in ("q", "k", "v", "gate", "up"))):
            w = w[:, idx]
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            w = w[idx]
        elif name.endswith("layernorm.weight") or name == "model.norm.weight":
            w = w[idx] * scale
        out[name] = w
    return out


def _prune(model, removed=REMOVED, **extra):
    return apply_plan(model, parse_plan({"steps": [{"op": "prune_hidden", "channels": removed, **extra}]}))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("rescale", [True, False])
def test_prune_hidden_matches_reference(family, rescale):
    model = make_model(family)
    ids = tokens()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        full = model(ids).logits
        # the reference is checked against transformers on the unpruned model first: it can fail
        torch.testing.assert_close(reference_logits(sd, model.config, ids), full, atol=ATOL, rtol=0)
        pruned, res = _prune(model, rescale_norms=rescale)
        keep = [c for c in range(64) if c not in REMOVED]
        scale = math.sqrt(64 / 56) if rescale else 1.0
        got = pruned(ids).logits
        torch.testing.assert_close(got, reference_logits(sliced_state(sd, keep, scale), pruned.config, ids),
                                   atol=ATOL, rtol=0)
    assert res.result_hidden == 56 and pruned.config.hidden_size == 56
    assert (got - full).abs().max() > 1e-2  # real channels removed: the function changed
    if model.config.tie_word_embeddings:
        assert pruned.lm_head.weight is pruned.model.embed_tokens.weight


def test_removing_zero_channels_is_exact():
    model = make_model("llama")
    ids = tokens()
    with torch.no_grad():
        # a residual channel that nothing writes stays zero: embedding columns and o/down output rows
        model.model.embed_tokens.weight[:, REMOVED] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[REMOVED] = 0
            layer.mlp.down_proj.weight[REMOVED] = 0
        full = model(ids).logits
        import copy

        unscaled, _ = _prune(copy.deepcopy(model), rescale_norms=False)
        pruned, _ = _prune(model)
        torch.testing.assert_close(pruned(ids).logits, full, atol=ATOL, rtol=0)
        # without the sqrt(hidden / kept) norm rescale the RMS is taken over fewer channels: not the same model
        assert (unscaled(ids).logits - full).abs().max() > 1e-2


def test_uniform_width_saves_and_loads_with_plain_transformers(tmp_path, capsys):
    src = save_tiny(tmp_path / "src", "llama")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "steps": [
        {"op": "prune_hidden", "channels": REMOVED},
        {"op": "prune_neurons", "layer": 1, "neurons": [0, 7]}, {"op": "prune_neurons", "layer": 0, "neurons": [3, 4]},
        {"op": "prune_neurons", "layer": 2, "neurons": [1, 2]}]}))
    code, _, err = call(capsys, "apply", plan, "--model", src, "--out", tmp_path / "out")
    assert code == 0, err
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["hidden_size"] == 56 and cfg["head_dim"] == 16 and "surgery_layers" not in cfg
    ids = tokens()
    orig = AutoModelForCausalLM.from_pretrained(src).eval()
    expected, _ = apply_plan(orig, parse_plan(json.loads(plan.read_text())))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("family", "channels", "needle"), [
    ("llama", list(range(64)), "removes every one of the model's 64 channels"),
    ("llama", [3, 64], "channel 64 out of range (the model has 64 channels)"),
    ("llama", [0, 1, 2], "hidden size 61 (64 - 3) cannot be expressed"),
    ("gemma3", [0, 1, 2, 3], "prune_hidden is not supported for gemma3"),
])
def test_bad_prune_hidden_is_one_line_exit_2(tmp_path, capsys, family, channels, needle):
    src = save_tiny(tmp_path / "src", family)
    capsys.readouterr()  # save_pretrained's progress bar
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "steps": [{"op": "prune_hidden", "channels": channels}]}))
    code, _, err = call(capsys, "apply", plan, "--model", src, "--out", tmp_path / "out")
    assert code == 2
    line = one_error_line(err)
    assert needle in line
    if "61" in needle:
        assert "nearest legal sizes: 60 (remove 4 channels)" in line  # 64 itself removes nothing: not offered
    assert not (tmp_path / "out").exists()


def test_streaming_apply_says_why_it_runs_in_memory():
    plan = parse_plan({"steps": [{"op": "prune_hidden", "channels": [0, 1]}]})
    (reason,) = plan_blockers(plan)
    assert "prune_hidden" in reason and "in memory" in reason
