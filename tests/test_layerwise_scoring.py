"""`score --layerwise` (surgery.importance.layerwise) against the whole-model scorer, the oracle: the same score
file (same tensors, same metadata apart from `layerwise` and the wall time) on every family, bf16 shards,
surgery checkpoints and MoE checkpoints, holding one block at a time; and its refusals (one line, exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import call, one_error_line
from safetensors import safe_open
from tiny_models import FAMILIES, VOCAB, make_config, make_model, save_tiny, tiny_tokenizer

from surgery.importance import score_source
from surgery.arch import spec_for_config
from surgery.importance.layerwise import layerwise_methods, score_checkpoint_layerwise

SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
FORWARD = "head-act,neuron-act,neuron-wanda,layer-bi,sv-act"
# 7 blocks of 16 tokens in batches of 3: the last batch is smaller, as a real run's last batch can be
OPTIONS = dict(tokens=112, seq_len=16, batch_size=3)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    if SHAKESPEARE.is_file():
        path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    else:  # no ../shared checkout: any text of the tokenizer's characters
        path.write_text("First Citizen: Before we proceed any further, hear me speak.\n" * 60, encoding="utf-8")
    return path


# non-uniform cut of a tiny Qwen2: heads, neurons, low rank, a dropped MLP and a dropped layer (surgery_layers)
CUT = {"version": 1, "steps": [
    {"op": "prune_heads", "layer": 0, "heads": [0, 2]},
    {"op": "low_rank", "module": "model.layers.0.self_attn.q_proj", "rank": 5},
    {"op": "prune_neurons", "layer": 1, "neurons": [1, 5, 6, 7, 50, 95]},
    {"op": "low_rank", "module": "model.layers.1.mlp.down_proj", "rank": 7},
    {"op": "drop_mlp", "layer": 0},
    {"op": "drop_layers", "layers": [2]},
]}  # fmt: skip


def save_mixtral(path: Path) -> Path:
    """A tiny Mixtral (experts stored one by one on disk as block_sparse_moe.experts.N.w1, fused in memory)."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, num_experts_per_tok=2, initializer_range=0.3,
                        max_position_embeddings=128, intermediate_size=32, num_local_experts=6)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def assert_same_scores(whole, layerwise):
    assert layerwise.meta.layerwise is True and whole.meta.layerwise is None
    skip = {"layerwise", "seconds"}
    assert whole.meta.model_dump(exclude=skip) == layerwise.meta.model_dump(exclude=skip)
    assert whole.tensors.keys() == layerwise.tensors.keys()
    for name, value in whole.tensors.items():
        assert value.dtype == layerwise.tensors[name].dtype == torch.float32
        torch.testing.assert_close(layerwise.tensors[name], value, rtol=1e-5, atol=1e-6, msg=name)


def applicable(family: str) -> list[str]:
    """Every method `--layerwise` runs on this family (channel-norm where prune_hidden cuts, no expert methods)."""
    methods = [m.name for m in layerwise_methods("all", arch=spec_for_config(make_config(family)))]
    assert set(methods) >= set(FORWARD.split(",")) | {"sv", "head-magnitude", "neuron-magnitude"}
    assert ("channel-norm" in methods) == (family in ("llama", "qwen2", "qwen3"))
    return methods


def both(src: Path, text: Path, methods: str, **kw):
    whole = score_source(str(src), str(text), methods, **OPTIONS, **kw)
    return whole, score_source(str(src), str(text), methods, layerwise=True, **OPTIONS, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_scores_equal_the_whole_model(tmp_path, text, family):
    src = save_tiny(tmp_path / family, family)
    methods = applicable(family)
    whole, layerwise = both(src, text, ",".join(methods))
    assert {name.rpartition("/")[2] for name in whole.tensors} == {m.replace("-", "_") for m in methods}
    assert_same_scores(whole, layerwise)


def test_bf16_shards_and_dtypes(tmp_path, text):
    """bf16 weights in several shards, scored in float32 (cast on read, as from_pretrained casts) and in bf16."""
    src = tmp_path / "bf16"
    make_model("gemma3").to(torch.bfloat16).save_pretrained(src, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file()
    for dtype in ("float32", "bfloat16"):
        whole, layerwise = both(src, text, FORWARD, dtype=dtype)
        assert layerwise.meta.dtype == dtype
        assert_same_scores(whole, layerwise)


def test_surgery_checkpoint_and_moe(tmp_path, text):
    """Per-layer shapes, low-rank modules, a dropped layer (surgery_layers); experts stored one by one (MoE)."""
    from surgery.pipeline import apply_to_source
    from surgery.plan import parse_plan

    src = save_tiny(tmp_path / "src", "qwen2")
    apply_to_source(parse_plan(CUT), tmp_path / "cut", str(src), stream=False)
    assert_same_scores(*both(tmp_path / "cut", text, FORWARD + ",sv"))
    moe = save_mixtral(tmp_path / "moe")
    whole, layerwise = both(moe, text, FORWARD + ",sv,expert-freq,expert-reap")
    assert {"expert_freq", "expert_reap"} <= {name.rpartition("/")[2] for name in whole.tensors}
    assert_same_scores(whole, layerwise)


def test_one_block_at_a_time(tmp_path, text, monkeypatch):
    """While a block runs, every other decoder block's parameters are on the meta device (not in memory); each
    block runs once per batch, in order; the final norm and lm_head are never read."""
    from surgery.data import load_blocks
    from surgery.importance import layerwise
    from surgery.loading import load_tokenizer, read_config
    from surgery.sources import resolve_source

    src = save_tiny(tmp_path / "qwen3", "qwen3")
    resolved = resolve_source(str(src))
    batches = list(load_blocks(str(text), load_tokenizer(resolved), 16, 64).batches(2))
    seen: list[int] = []
    built = layerwise.skeleton_model

    def skeleton(*args, **kwargs):
        model = built(*args, **kwargs)
        layers = model.model.layers

        def check(module, _args):
            loaded = [i for i, layer in enumerate(layers) if not any(p.is_meta for p in layer.parameters())]
            assert loaded == [list(layers).index(module)]
            seen.append(loaded[0])

        for layer in layers:
            layer.register_forward_pre_hook(check)
        skeleton.model = model
        return model

    monkeypatch.setattr(layerwise, "skeleton_model", skeleton)
    score_checkpoint_layerwise(resolved, read_config(resolved), batches, FORWARD)
    assert seen == [i for i in range(3) for _ in batches]
    model = skeleton.model
    assert all(p.is_meta for p in model.model.layers.parameters())  # every block freed after its turn
    assert model.model.norm.weight.is_meta and model.lm_head.weight.is_meta


def test_cli_layerwise_writes_the_score_file(capsys, tmp_path, text):
    src = save_tiny(tmp_path / "llama", "llama")
    out = tmp_path / "scores.safetensors"
    code, stdout, _ = call(capsys, "score", src, "--data", text, "--tokens", 64, "--seq-len", 16, "--method",
                           "fast", "--layerwise", "--out", out, "--json")
    assert code == 0, stdout
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["layerwise"] == "True"
        # the alias keeps what runs layer by layer on this model (no gradient method of `fast`)
        assert {k.rpartition("/")[2] for k in f.keys()} == {m.replace("-", "_") for m in applicable("llama")}


@pytest.mark.parametrize("argv, needle", [
    (("--method", "head-act,head-grad,sv-grad"), "head-grad, sv-grad (gradients or ablation"),
    (("--method", "ablate"), "head-ablate, layer-ablate"),
    (("--method", "head-act", "--device-map", "auto"), "drop --device-map"),
])  # fmt: skip
def test_cli_refusals_are_one_line(capsys, tmp_path, text, argv, needle):
    out = tmp_path / "s.safetensors"
    code, _, err = call(capsys, "score", tmp_path / "no-model-needed", "--data", text, "--layerwise", *argv,
                        "--out", out)
    line = one_error_line(err)
    assert code == 2 and needle in line and not out.exists()
    if "gradients" in needle:
        assert "layer by layer works for: head-act, neuron-act, neuron-wanda, layer-bi, sv" in line
