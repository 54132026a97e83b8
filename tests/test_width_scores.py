"""Channel (Minitron) and expert (frequency, REAP) scores against their explicit definitions."""

from __future__ import annotations

import pytest
import torch

import test_prune_hidden
from surgery.errors import UserError
from surgery.importance.width import channel_norm_scores, expert_scores
from test_prune_experts import moe_model
from tiny_models import make_model, tokens


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
