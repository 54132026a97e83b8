"""Channel (Minitron norms, Taylor of a channel gate) and expert (frequency, REAP, gate gradient) scores against
their explicit definitions: a reference forward, token-by-token routing, autograd of real gates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import test_prune_hidden
from cli_helpers import call, one_error_line
from surgery.apply import apply_plan
from surgery.errors import UserError
from surgery.importance import load_scores, score_model
from surgery.importance.width import channel_norm_scores, expert_scores
from surgery.plan import parse_plan
from test_prune_experts import moe_model
from tiny_models import make_model, save_tiny, tokens


def test_channel_scores_match_the_reference_forward(monkeypatch):
    model = make_model("llama")
    batches = [tokens(seed=1), tokens(seed=2)]
    got = channel_norm_scores(model, batches)
    # the same quantity from the forward pass written from the definition (tests/test_prune_hidden.py)
    outs: list[torch.Tensor] = []
    rms = test_prune_hidden._rms

    def recording(x, w, eps):
        y = rms(x, w, eps)
        outs.append(y)
        return y

    monkeypatch.setattr(test_prune_hidden, "_rms", recording)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    per_batch = []
    for ids in batches:
        outs.clear()
        with torch.no_grad():
            test_prune_hidden.reference_logits(sd, model.config, ids)
        assert len(outs) == 2 * model.config.num_hidden_layers + 1
        per_batch.append(sum(o.abs().reshape(-1, 64).sum(0) for o in outs))
    expected = sum(per_batch) / sum(ids.numel() for ids in batches)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert got.std() > 0  # the perturbed norm weights make channels differ: a constant would not pass


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_scores_match_token_by_token_definition(family):
    model = moe_model(family)
    ids = tokens()
    got = expert_scores(model, [ids])
    inputs = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, 64)))
    with torch.no_grad():
        model(ids)
        for i, x in inputs.items():
            mlp, n, k = model.model.layers[i].mlp, mlp_experts(model), model.config.num_experts_per_tok
            count, reap = torch.zeros(n), torch.zeros(n)
            for t in range(x.shape[0]):
                probs = torch.softmax(x[t] @ mlp.gate.weight.T, -1)
                top, idx = torch.topk(probs, k)
                if family == "mixtral":
                    top = top / top.sum()
                for w, e in zip(top.tolist(), idx.tolist()):
                    # the model's own expert module, routed to e alone with weight 1
                    out = mlp.experts(x[t:t + 1], torch.tensor([[e]]), torch.tensor([[1.0]]))
                    count[e] += 1
                    reap[e] += w * out.norm()
            torch.testing.assert_close(got[i]["frequency"], count / x.shape[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(got[i]["reap"], reap / count.clamp(min=1), atol=1e-4, rtol=1e-4)
            assert got[i]["frequency"].sum().item() == pytest.approx(k)


def mlp_experts(model) -> int:
    return model.config.to_dict()["num_local_experts"]


def test_expert_scores_refuse_a_dense_model():
    with pytest.raises(UserError, match="has no experts"):
        expert_scores(make_model("llama"), [tokens()])


# -- the registry methods, from the runner's one forward+backward per batch ---------------------------------------
# three blocks in batches of 2 and 1: unequal batches check the per-batch weighting
BLOCKS = tokens(batch=3, length=10, seed=3)
BATCHES = [BLOCKS[:2], BLOCKS[2:]]


def _loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def gate_residual_writes(model, xi: torch.Tensor) -> list:
    """Hooks multiplying the embedding output and every attention / MLP block output by `xi` (hidden,)."""
    def gate(module, args, out):
        return (out[0] * xi, *out[1:]) if isinstance(out, tuple) else out * xi

    writers = [model.model.embed_tokens] + [m for layer in model.model.layers for m in (layer.self_attn, layer.mlp)]
    return [m.register_forward_hook(gate) for m in writers]


def explicit_channel_gates(model) -> torch.Tensor:
    """Reference: a real gate xi (hidden,) multiplying the embedding output and every attention / MLP block output
    (the residual writes); sum over batches of |dL_b/dxi| by autograd."""
    xi = torch.ones(model.config.hidden_size, requires_grad=True)
    handles = gate_residual_writes(model, xi)
    total = torch.zeros_like(xi)
    try:
        for ids in BATCHES:
            total += torch.autograd.grad(_loss(model, ids), xi)[0].abs()
    finally:
        for h in handles:
            h.remove()
    return total


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_channel_taylor_equals_autograd_of_an_explicit_channel_gate(family):
    model = make_model(family)
    got = score_model(model, BATCHES, "channel-taylor,channel-norm,head-grad")
    ref = explicit_channel_gates(model)
    torch.testing.assert_close(got["model/channel_taylor"], ref, rtol=1e-4, atol=1e-7)
    assert ref.min() > 0 and ref.std() > 0  # a real, non-constant reference
    assert got["model/channel_norm"].shape == (64,) and got["model.layers.0.self_attn/head_grad"].shape == (4,)


def test_channel_gate_at_zero_is_prune_hidden():
    """Why the gate sits on the embedding and the residual writes: gating channels to 0 there gives the logits of
    the model with those channels pruned (prune_hidden with its norm rescale)."""
    model, ids, gone = make_model("llama"), tokens(), [3, 17, 40, 41]
    xi = torch.ones(64)
    xi[gone] = 0
    with torch.no_grad():
        handles = gate_residual_writes(model, xi)
        gated = model(ids).logits
        for h in handles:
            h.remove()
        pruned, _ = apply_plan(make_model("llama"), parse_plan({"steps": [{"op": "prune_hidden", "channels": gone}]}))
        torch.testing.assert_close(pruned(ids).logits, gated, atol=1e-4, rtol=1e-4)
        assert (model(ids).logits - gated).abs().max() > 1e-2


def explicit_expert_gates(model) -> dict[int, torch.Tensor]:
    """Reference: every MoE block's output recomputed token by token from its router choice as
    sum over the token's top-k of g_e * w * E_e(x) with real gates g; sum over batches of |dL_b/dg| by autograd."""
    gates = {i: torch.ones(mlp_experts(model), requires_grad=True) for i in range(len(model.model.layers))}

    def hook(i):
        def recompute(module, args, out):
            x = args[0].reshape(-1, args[0].shape[-1])
            _, weights, idx = module.gate(x)
            rows = []
            for t in range(x.shape[0]):
                y = 0
                for slot in range(idx.shape[1]):
                    e = int(idx[t, slot])
                    one = module.experts(x[t:t + 1], torch.tensor([[e]]), torch.ones(1, 1))  # E_e(x), weight 1
                    y = y + gates[i][e] * weights[t, slot] * one[0]
                rows.append(y)
            return torch.stack(rows).reshape(out.shape)
        return recompute

    handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    flat = list(gates.values())
    sums = {i: torch.zeros_like(g) for i, g in gates.items()}
    try:
        for ids in BATCHES:
            for i, g in zip(gates, torch.autograd.grad(_loss(model, ids), flat)):
                sums[i] += g.abs()
    finally:
        for h in handles:
            h.remove()
    return sums


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_grad_equals_autograd_of_explicit_expert_gates(family):
    model = moe_model(family)
    got = score_model(model, BATCHES, "expert-grad,expert-freq,expert-reap,head-grad")
    ref = explicit_expert_gates(model)
    for i, expected in ref.items():
        torch.testing.assert_close(got[f"model.layers.{i}.mlp/expert_grad"], expected, rtol=1e-4, atol=1e-6)
        assert expected.sum() > 0
    # frequency and REAP from this same combined pass equal the forward-only library call (checked above)
    alone = expert_scores(model, BATCHES)
    for i, s in alone.items():
        torch.testing.assert_close(got[f"model.layers.{i}.mlp/expert_freq"], s["frequency"])
        torch.testing.assert_close(got[f"model.layers.{i}.mlp/expert_reap"], s["reap"])


def test_fast_keeps_the_axes_the_model_has():
    dense = set(score_model(make_model("llama"), BATCHES, "fast"))
    assert {"model/channel_norm", "model/channel_taylor"} <= dense
    assert not any("expert" in k for k in dense)
    gpt2 = set(score_model(make_model("gpt2"), BATCHES, "fast"))
    assert not any("channel" in k or "expert" in k for k in gpt2)
    moe = score_model(moe_model("qwen3_moe"), BATCHES, "fast")
    assert {f"model.layers.{i}.mlp/{m}" for i in (0, 1) for m in ("expert_freq", "expert_reap", "expert_grad")} <= set(moe)
    assert moe["model.layers.1.mlp/expert_grad"].shape == (6,) and not any("channel" in k for k in moe)


@pytest.mark.parametrize("family, method, legal", [("gpt2", "channel-norm", "it cuts llama, mistral, qwen2, qwen3"),
                                                   ("llama", "expert-reap", "has none (mixture-of-experts only)")])
def test_a_named_method_the_model_lacks_the_axis_for_is_refused(family, method, legal):
    with pytest.raises(UserError, match="methods for this model: head-grad") as exc:
        score_model(make_model(family), BATCHES, method)
    assert legal in str(exc.value) and "\n" not in str(exc.value)


def test_cli_score_expert_method_on_a_dense_model_is_one_line(capsys, tmp_path):
    src = save_tiny(tmp_path / "src")
    data = tmp_path / "calib.txt"
    data.write_text("The quick brown fox jumps over the lazy dog.\n" * 10)
    out = tmp_path / "s.safetensors"
    capsys.readouterr()  # save_pretrained's progress bar
    code, _, err = call(capsys, "score", src, "--data", data, "--tokens", "64", "--seq-len", "32",
                        "--method", "expert-grad", "--out", out)
    line = one_error_line(err)
    assert code == 2 and "expert-grad" in line and "channel-taylor" in line  # lists what this model has
    assert not out.exists()
    code, _, err = call(capsys, "score", src, "--data", data, "--tokens", "64", "--seq-len", "32",
                        "--method", "channel-taylor,expert-freq", "--out", out)
    assert code == 2 and not out.exists()
    code, stdout, err = call(capsys, "score", src, "--data", data, "--tokens", "64", "--seq-len", "32",
                             "--method", "channel-norm,channel-taylor", "--out", out, "--json")
    assert code == 0, err
    scores = load_scores(out)
    assert scores.get("model", "channel_taylor").shape == (64,) and scores.meta.methods == ["channel-norm",
                                                                                          "channel-taylor"]
