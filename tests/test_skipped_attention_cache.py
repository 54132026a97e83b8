"""A dropped attention must keep KV-cached decoding equal to full recomputation, token after token.

Why a logit check over several steps: with the cache's length wrong, the first cached step can still pick the same
token on a tiny model; the logits show the error from the first cached step on.
"""

from __future__ import annotations

import pytest
import torch

from surgery.apply import apply_plan
from surgery.metrics.speed import _cache_arg, _cache_of
from surgery.plan import parse_plan
from tiny_models import make_model, tokens

STEPS = 6


def _cached_vs_recomputed(model, prompt: torch.Tensor) -> list[float]:
    """Greedy decoding through the KV cache; each step's last logits against a fresh uncached forward."""
    gaps, cache_kw = [], _cache_arg(model)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache, seq = _cache_of(out), prompt
        for _ in range(STEPS):
            nxt = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], dim=1)
            out = model(nxt, use_cache=True, **{cache_kw: cache})
            cache = _cache_of(out)
            full = model(seq, use_cache=False).logits[:, -1]
            gaps.append((out.logits[:, -1] - full).abs().max().item())
        assert cache.get_seq_length() == seq.shape[1]
    return gaps


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("layer", [0, 1])
def test_cached_decoding_matches_recomputation_after_drop_attention(family, layer):
    pruned, _ = apply_plan(make_model(family), parse_plan({"version": 1, "steps": [{"op": "drop_attention",
                                                                                     "layer": layer}]}))
    gaps = _cached_vs_recomputed(pruned, tokens(batch=2, length=6))
    assert max(gaps) < 1e-4, gaps


def test_generate_with_cache_matches_without_after_loading(tmp_path):
    """The saved-and-loaded model (`surgery.load`, what the GGUF helper compares against) decodes alike both ways."""
    import surgery
    from surgery.export import save_model_dir

    pruned, _ = apply_plan(make_model("llama"), parse_plan({"version": 1, "steps": [{"op": "drop_attention",
                                                                                      "layer": 0}]}))
    save_model_dir(pruned, tmp_path / "out")
    loaded = surgery.load(str(tmp_path / "out")).eval()
    prompt = tokens(batch=1, length=6)
    assert max(_cached_vs_recomputed(loaded, prompt)) < 1e-4
    with torch.no_grad():
        cached = loaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = loaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
