"""surgery.inspect: shapes, parameter counts and FLOPs from headers only.

Checkpoints here are either saved from tiny real models, or hand-built: a valid safetensors header followed by a
sparse file of the right length (`truncate`), so a 13 GB "7B" checkpoint costs no disk and no writes.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, make_config, make_model

from surgery import ops
from surgery.arch import spec_for_config
from surgery.errors import SourceError, UnsupportedModelError
from surgery.inspect import inspect_model, read_gguf_header
from surgery.shapes import LayerShape

_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def write_sparse_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """A valid safetensors file whose data section is a hole: header written, data never. Returns data bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in tensors.items():
        n = _BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: no data block is ever allocated
    return offset


def llama_tensors(layers, hidden, vocab, dtype="F16", tied=False):
    """Tensor names/shapes of a Llama checkpoint; `layers` is a list of (heads, kv_heads, head_dim, mlp, low_rank)."""
    t = {"model.embed_tokens.weight": (dtype, (vocab, hidden))}
    for i, (hq, hkv, hd, mlp, low_rank) in enumerate(layers):
        p = f"model.layers.{i}"
        if hq:
            t[f"{p}.input_layernorm.weight"] = (dtype, (hidden,))
            for name, rows in (("q_proj", hq * hd), ("k_proj", hkv * hd), ("v_proj", hkv * hd)):
                t[f"{p}.self_attn.{name}.weight"] = (dtype, (rows, hidden))
            t[f"{p}.self_attn.o_proj.weight"] = (dtype, (hidden, hq * hd))
        else:  # SkippedAttention: zero-length placeholder under o_proj, its norm gone
            t[f"{p}.self_attn.o_proj.weight"] = (dtype, (0,))
        if mlp:
            t[f"{p}.post_attention_layernorm.weight"] = (dtype, (hidden,))
            t[f"{p}.mlp.gate_proj.weight"] = (dtype, (mlp, hidden))
            t[f"{p}.mlp.up_proj.weight"] = (dtype, (mlp, hidden))
            if "mlp.down_proj" in low_rank:  # LowRankLinear: a (r, in), b (out, r), placeholder weight
                r = low_rank["mlp.down_proj"]
                t[f"{p}.mlp.down_proj.a.weight"] = (dtype, (r, mlp))
                t[f"{p}.mlp.down_proj.b.weight"] = (dtype, (hidden, r))
                t[f"{p}.mlp.down_proj.weight"] = (dtype, (0,))
            else:
                t[f"{p}.mlp.down_proj.weight"] = (dtype, (hidden, mlp))
        else:
            t[f"{p}.mlp.down_proj.weight"] = (dtype, (0,))
    t["model.norm.weight"] = (dtype, (hidden,))
    if not tied:
        t["lm_head.weight"] = (dtype, (vocab, hidden))
    return t


def llama_config(hidden, layers, heads, kv_heads, mlp, vocab, tied=False, **extra):
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": mlp,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        **extra,
    }


# ------------------------------------------------------------------------------------------------ 7B headers --


@pytest.fixture(scope="module")
def llama2_7b_dir(tmp_path_factory) -> Path:
    """Llama-2-7B as a 2-shard fp16 safetensors set with sparse data (13.5 GB apparent, ~0 on disk)."""
    d = tmp_path_factory.mktemp("llama2-7b")
    (d / "config.json").write_text(json.dumps(llama_config(4096, 32, 32, 32, 11008, 32000)))
    tensors = llama_tensors([(32, 32, 128, 11008, {})] * 32, hidden=4096, vocab=32000)
    names = list(tensors)
    split = names.index("model.layers.16.input_layernorm.weight")
    shards = {"model-00001-of-00002.safetensors": names[:split], "model-00002-of-00002.safetensors": names[split:]}
    weight_map, total = {}, 0
    for shard, shard_names in shards.items():
        total += write_sparse_safetensors(d / shard, {n: tensors[n] for n in shard_names})
        weight_map.update(dict.fromkeys(shard_names, shard))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def test_llama2_7b_from_sparse_shards_is_exact_fast_and_small(llama2_7b_dir):
    tracemalloc.start()
    t0 = time.perf_counter()
    report = inspect_model(llama2_7b_dir, context=2048)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert report.params_total == 6_738_415_616
    assert report.params_embedding == 2 * 32000 * 4096
    assert report.params_non_embedding == 6_738_415_616 - 2 * 32000 * 4096
    assert report.bytes == 2 * 6_738_415_616 and report.dtypes == {"F16": 2 * 6_738_415_616}
    assert (report.family, report.num_layers, report.hidden, report.vocab) == ("llama", 32, 4096, 32000)
    assert not report.tied_embeddings
    attn, mlp = 4 * 4096 * 4096, 3 * 4096 * 11008
    for layer in report.layers:
        assert (layer.heads, layer.kv_heads, layer.head_dim, layer.mlp) == (32, 32, 128, 11008)
        assert layer.has_attention and layer.has_mlp and layer.low_rank == {}
        assert (layer.params_attention, layer.params_mlp, layer.params_norms) == (attn, mlp, 2 * 4096)
        assert layer.params_total == attn + mlp + 2 * 4096 == 202_383_360
        assert layer.flops_per_token == 2 * (attn + mlp) + 2 * 2 * 32 * 128 * 2048
    assert report.flops_per_token == 32 * report.layers[0].flops_per_token + 2 * 32000 * 4096
    assert elapsed < 1.0, f"inspect took {elapsed:.3f} s"
    assert peak < 50 * 2**20, f"tracemalloc peak {peak / 2**20:.1f} MB"
    json.dumps(report.to_dict())


# --------------------------------------------------------------------------------------- tiny real models ----


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _assert_matches_model(report, model, spans: list[int]) -> None:
    """Every per-layer count of `report` equals the live module's, and the totals dedupe a tied embedding.

    `spans`: tokens each layer attends to (the context, or a shorter sliding window).
    """
    spec = spec_for_config(model.config)
    assert report.params_total == _param_count(model)
    embed = ops.get_module(model, spec.embed).weight
    head = ops.get_module(model, spec.lm_head).weight
    assert report.params_embedding == embed.numel() + (0 if head is embed else head.numel())
    assert report.tied_embeddings == (head is embed)
    for layer, r, span in zip(ops.get_module(model, spec.layers), report.layers, spans, strict=True):
        attn, mlp = ops.get_module(layer, spec.attn), ops.get_module(layer, spec.mlp)
        assert r.params_attention == _param_count(attn)
        assert r.params_mlp == _param_count(mlp)
        assert r.params_total == _param_count(layer)
        macs = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        macs += sum(m.weight.numel() for m in layer.modules() if type(m).__name__ == "Conv1D")
        assert r.flops_per_token == 2 * macs + 2 * 2 * r.heads * r.head_dim * span


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_of_every_family_matches_its_parameters(family, tmp_path):
    model = make_model(family)
    model.save_pretrained(tmp_path)
    report = inspect_model(tmp_path, context=16)

    cfg = make_config(family)
    spec = spec_for_config(cfg)
    heads = getattr(cfg, spec.cfg_heads)
    kv_heads = getattr(cfg, spec.cfg_kv_heads) if spec.cfg_kv_heads else heads
    assert report.family == spec.family and report.num_layers == 3
    for i, layer in enumerate(report.layers):
        assert (layer.index, layer.heads, layer.kv_heads, layer.mlp) == (i, heads, kv_heads, 96)
    # Gemma 3's sliding layers (0 and 2 here) attend to at most sliding_window = 4 tokens
    spans = [4, 16, 4] if family == "gemma3" else [16] * 3
    _assert_matches_model(report, model, spans)
    if family == "qwen2":  # q/k/v carry biases
        assert report.layers[0].params_attention == 2 * 64 * 64 + 2 * 32 * 64 + 64 + 2 * 32
    json.dumps(report.to_dict())


def test_qwen3_head_dim_wider_than_hidden_over_heads(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    report = inspect_model(tmp_path)
    assert [(r.heads, r.kv_heads, r.head_dim) for r in report.layers] == [(4, 2, 32)] * 2
    assert report.params_total == _param_count(model)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_model_cut_by_surgery_ops_is_reported_per_layer(family, tmp_path):
    """Real ops on a real model: pruned heads and neurons, dropped sub-blocks, a low-rank factor."""
    model = make_model(family)
    spec = spec_for_config(model.config)
    layers = ops.get_module(model, spec.layers)
    n_q = 4
    n_kv = 2 if spec.cfg_kv_heads else 4
    keep_kv = [0] if n_kv == 2 else [0, 2]
    keep_q = [0, 1] if n_kv == 2 else [0, 2]
    ops.prune_attention_heads(ops.get_module(layers[0], spec.attn), spec, keep_q, keep_kv, n_q, n_kv, 16)
    ops.prune_mlp_neurons(ops.get_module(layers[0], spec.mlp), spec, range(40), 96)
    ops.drop_attention(layers[1], spec, 1, 16)
    down = f"{spec.mlp}.{spec.down}"
    ops.low_rank(layers[1], down, 8, spec.conv1d)
    ops.drop_mlp(layers[2], spec)
    shapes = [
        LayerShape(2, len(keep_kv), 16, 40),
        LayerShape(0, 0, 16, 96, low_rank={down: 8}),
        LayerShape(n_q, n_kv, 16, 0),
    ]
    model.save_pretrained(tmp_path)  # as export does; config.json then gets the per-layer entries
    cfg = {**model.config.to_dict(), "surgery_layers": [s.to_entry() for s in shapes]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    report = inspect_model(tmp_path, context=16)
    got = [(r.heads, r.kv_heads, r.mlp, r.has_attention, r.has_mlp, r.low_rank) for r in report.layers]
    assert got == [
        (2, len(keep_kv), 40, True, True, {}),
        (0, 0, 96, False, True, {down: 8}),
        (n_q, n_kv, 0, True, False, {}),
    ]
    _assert_matches_model(report, model, [16] * 3)


# ---------------------------------------------------------------------------------- hand-built pruned dir ----


def _pruned_dir(tmp_path: Path, entries: list[dict]) -> Path:
    layers = [(4, 2, 16, 96, {}), (2, 1, 16, 40, {"mlp.down_proj": 8}), (0, 0, 16, 96, {}), (4, 2, 16, 0, {})]
    cfg = llama_config(64, 4, 4, 2, 96, 128, tied=True, head_dim=16, surgery_layers=entries)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_sparse_safetensors(tmp_path / "model.safetensors", llama_tensors(layers, 64, 128, "BF16", tied=True))
    return tmp_path


_ENTRIES = [
    {"heads": 4, "kv_heads": 2, "mlp": 96, "skip": []},
    {"heads": 2, "kv_heads": 1, "mlp": 40, "skip": [], "low_rank": {"mlp.down_proj": 8}, "source_layer": 3},
    {"heads": 0, "kv_heads": 0, "mlp": 96, "skip": ["self_attn"]},
    {"heads": 4, "kv_heads": 2, "mlp": 0, "skip": ["mlp"]},
]


def test_hand_built_pruned_checkpoint_is_reported_per_layer(tmp_path):
    report = inspect_model(_pruned_dir(tmp_path, _ENTRIES), context=100)
    r0, r1, r2, r3 = report.layers
    assert (r0.heads, r0.kv_heads, r0.mlp, r0.params_attention, r0.params_mlp) == (4, 2, 96, 64 * 192, 3 * 64 * 96)
    assert (r1.heads, r1.kv_heads, r1.mlp, r1.low_rank, r1.source_layer) == (2, 1, 40, {"mlp.down_proj": 8}, 3)
    assert r1.params_attention == 64 * (32 + 16 + 16) + 32 * 64
    assert r1.params_mlp == 2 * 40 * 64 + 8 * 40 + 64 * 8
    assert r1.flops_per_token == 2 * (r1.params_attention + r1.params_mlp) + 4 * 2 * 16 * 100
    assert (r2.has_attention, r2.heads, r2.params_attention, r2.params_norms) == (False, 0, 0, 64)
    assert r2.flops_per_token == 2 * 3 * 64 * 96  # no attention, no scores
    assert (r3.has_mlp, r3.mlp, r3.params_mlp, r3.params_norms) == (False, 0, 0, 64)
    layers = sum(r.params_total for r in report.layers)
    assert report.params_total == 128 * 64 + 64 + layers  # tied: the embedding once
    assert report.params_embedding == 128 * 64 and report.tied_embeddings
    assert report.dtypes == {"BF16": 2 * report.params_total}


def test_tensors_that_disagree_with_surgery_layers_name_the_layer(tmp_path):
    entries = [dict(e) for e in _ENTRIES]
    entries[1]["heads"] = 3
    with pytest.raises(SourceError, match=r"layer 1: .*query heads 2 .* says 3"):
        inspect_model(_pruned_dir(tmp_path, entries))


def test_tensors_that_disagree_with_the_plain_config_name_the_layer(tmp_path):
    cfg = llama_config(64, 2, 4, 2, 96, 128)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    layers = [(4, 2, 16, 96, {}), (4, 2, 16, 80, {})]
    write_sparse_safetensors(tmp_path / "model.safetensors", llama_tensors(layers, 64, 128))
    with pytest.raises(SourceError, match=r"layer 1: .*MLP width 80"):
        inspect_model(tmp_path)


# ------------------------------------------------------------------------------------------- bad sources ----


def _tiny_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(llama_config(64, 1, 4, 2, 96, 128)))
    write_sparse_safetensors(tmp_path / "model.safetensors", llama_tensors([(4, 2, 16, 96, {})], 64, 128))
    return tmp_path


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[:5], id="shorter-than-length"),
        pytest.param(lambda raw: raw[:40], id="header-cut"),
        pytest.param(lambda raw: raw[:-100], id="data-cut"),
        pytest.param(lambda raw: raw[:8] + b"{" * 16 + raw[24:], id="not-json"),
        pytest.param(lambda raw: struct.pack("<Q", 2**62) + raw[8:], id="absurd-length"),
    ],
)
def test_corrupt_safetensors_header_is_a_one_line_source_error(tmp_path, damage):
    f = _tiny_dir(tmp_path) / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(SourceError, match="corrupt safetensors header") as err:
        inspect_model(tmp_path)
    assert str(f) in str(err.value) and "\n" not in str(err.value)


def test_directory_without_config_is_a_source_error(tmp_path):
    (_tiny_dir(tmp_path) / "config.json").unlink()
    with pytest.raises(SourceError, match="no config.json"):
        inspect_model(tmp_path)


def test_unsupported_model_type_is_refused_before_reading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UnsupportedModelError, match="mamba"):
        inspect_model(tmp_path)


def test_missing_shard_is_a_source_error(llama2_7b_dir, tmp_path):
    index = json.loads((llama2_7b_dir / "model.safetensors.index.json").read_text())
    (tmp_path / "config.json").write_text((llama2_7b_dir / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match="model-00001-of-00002"):
        inspect_model(tmp_path)


# ------------------------------------------------------------------------------------------------------ GGUF --


def _write_gguf(path: Path, n_tokens: int = 300) -> None:
    """A tiny Llama GGUF (f32) with a tokenizer vocabulary long enough to be skipped, not parsed."""
    import numpy as np
    from gguf import GGUFWriter

    hidden, heads, kv, hd, mlp, vocab = 64, 4, 2, 16, 96, n_tokens
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(mlp)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_context_length(128)
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_token_types([1] * vocab)

    def t(name, *shape):  # numpy shapes are PyTorch order; GGUF stores them reversed
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))

    t("token_embd.weight", vocab, hidden)
    for i in range(2):
        t(f"blk.{i}.attn_norm.weight", hidden)
        t(f"blk.{i}.attn_q.weight", heads * hd, hidden)
        t(f"blk.{i}.attn_k.weight", kv * hd, hidden)
        t(f"blk.{i}.attn_v.weight", kv * hd, hidden)
        t(f"blk.{i}.attn_output.weight", hidden, heads * hd)
        t(f"blk.{i}.ffn_norm.weight", hidden)
        t(f"blk.{i}.ffn_gate.weight", mlp, hidden)
        t(f"blk.{i}.ffn_up.weight", mlp, hidden)
        t(f"blk.{i}.ffn_down.weight", hidden, mlp)
    t("output_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_is_inspected_from_its_header(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    meta, _ = read_gguf_header(path)
    assert meta["tokenizer.ggml.tokens"].length == 300  # skipped, only counted
    report = inspect_model(path, context=32)
    assert (report.format, report.family, report.vocab, report.tied_embeddings) == ("gguf", "llama", 300, True)
    layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 96 + 2 * 64
    assert [(r.heads, r.kv_heads, r.mlp, r.params_total) for r in report.layers] == [(4, 2, 96, layer)] * 2
    assert report.params_total == 300 * 64 + 2 * layer + 64
    assert report.dtypes == {"F32": 4 * report.params_total}


def test_truncated_gguf_is_a_source_error(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    raw = path.read_bytes()
    for cut in (200, len(raw) - 1000):  # inside the vocabulary; inside the tensor data
        path.write_bytes(raw[:cut])
        with pytest.raises(SourceError, match="corrupt gguf header"):
            inspect_model(path)


# ------------------------------------------------------------------------------------------------------ demo --


@pytest.mark.demo
def test_demo_model_dir_and_gguf():
    from surgery.cache import is_complete
    from surgery.demo import demo_dir, demo_gguf_path

    if not is_complete(demo_dir()) or not demo_gguf_path().is_file():
        pytest.skip("demo model not fetched (run `surgery.demo.fetch_demo()` once)")
    hf, gguf = inspect_model(demo_dir()), inspect_model(demo_gguf_path())
    for report in (hf, gguf):
        assert report.params_total == 134_515_008  # SmolLM2-135M, lm_head tied to the embedding
        assert (report.num_layers, report.hidden, report.vocab, report.tied_embeddings) == (30, 576, 49152, True)
        assert {(r.heads, r.kv_heads, r.head_dim, r.mlp) for r in report.layers} == {(9, 3, 64, 1536)}
    assert hf.to_dict()["layers"] == gguf.to_dict()["layers"]


def test_tied_checkpoint_that_kept_only_the_head_copy(tmp_path):
    """Some writers (safetensors' save_model) keep the tied tensor under lm_head's name: still counted once."""
    (tmp_path / "config.json").write_text(json.dumps(llama_config(64, 1, 4, 2, 96, 128, tied=True)))
    tensors = llama_tensors([(4, 2, 16, 96, {})], 64, 128, tied=False)
    del tensors["model.embed_tokens.weight"]
    write_sparse_safetensors(tmp_path / "model.safetensors", tensors)
    report = inspect_model(tmp_path)
    assert report.params_embedding == 128 * 64
    assert report.params_total == 128 * 64 + report.layers[0].params_total + 64
