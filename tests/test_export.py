"""Writing pruned models: plain-transformers loadability, surgery.load for the rest, determinism, atomicity."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from surgery.apply import apply_plan
from surgery.errors import UserError
from surgery.export import MANIFEST, load_surgery_checkpoint, save_model_dir
from surgery.plan import parse_plan
from tiny_models import FAMILIES, make_model, tokens


def _uniform_steps(family: str) -> list[dict]:
    """The same cut in every layer: one query head per KV group and 16 neurons."""
    heads = [0] if family == "gpt2" else [0, 2]
    steps = []
    for layer in range(3):
        steps.append({"op": "prune_heads", "layer": layer, "heads": heads})
        steps.append({"op": "prune_neurons", "layer": layer, "neurons": list(range(16))})
    return steps


def _nonuniform_steps(family: str) -> list[dict]:
    return [{"op": "prune_neurons", "layer": 1, "neurons": [3, 4]}, {"op": "drop_attention", "layer": 2},
            {"op": "drop_layers", "layers": [0]}]


def _pruned(family, steps):
    model, _ = apply_plan(make_model(family), parse_plan({"version": 1, "steps": steps}))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_cut_loads_with_plain_transformers(tmp_path, family):
    pruned = _pruned(family, _uniform_steps(family))
    save_model_dir(pruned, tmp_path / "out", manifest={"version": 1})
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    x = tokens()
    with torch.no_grad():
        want = pruned(x).logits
    if family == "gpt2":
        # GPT-2 derives head_dim = n_embd / n_head: fewer heads cannot be said in a plain GPT-2 config
        assert manifest["output"]["loadable_with"] == "surgery"
        reloaded = load_surgery_checkpoint(tmp_path / "out")
    else:
        assert manifest["output"]["loadable_with"] == "transformers"
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_nonuniform_cut_loads_with_surgery_and_plain_load_fails_loudly(tmp_path, family):
    pruned = _pruned(family, _nonuniform_steps(family))
    save_model_dir(pruned, tmp_path / "out")
    x = tokens()
    reloaded = load_surgery_checkpoint(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, pruned(x).logits, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError):  # never a silent random re-init of the removed parts
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    # and the config names the loader to whoever looks after that refusal (issue 16)
    hint = json.loads((tmp_path / "out" / "config.json").read_text())["surgery_load_with"]
    assert hint.startswith("surgery.load(DIR)") and "ignore_mismatched_sizes" in hint


def test_low_rank_checkpoint_roundtrips(tmp_path):
    steps = [{"op": "low_rank", "module": "model.layers.1.mlp.down_proj", "rank": 8}]
    pruned = _pruned("llama", steps)
    save_model_dir(pruned, tmp_path / "out")
    reloaded = load_surgery_checkpoint(tmp_path / "out")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, pruned(x).logits, atol=1e-5, rtol=0)


def test_head_count_that_does_not_divide_hidden_is_kept_loadable(tmp_path):
    """LlamaConfig refuses hidden 96 with 5 heads even with head_dim set; the output must still load."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=6, head_dim=16, initializer_range=0.3)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    steps = [{"op": "prune_heads", "layer": i, "heads": [5]} for i in range(2)]
    pruned, _ = apply_plan(model, parse_plan({"version": 1, "steps": steps}))
    assert pruned.config.to_dict()["surgery_layers"][0]["heads"] == 5
    save_model_dir(pruned, tmp_path / "out")
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_surgery_checkpoint(tmp_path / "out")(x).logits, pruned(x).logits)


def test_same_plan_twice_gives_byte_identical_safetensors(tmp_path):
    steps = _nonuniform_steps("llama") + [{"op": "low_rank", "module": "model.layers.1.mlp.up_proj", "rank": 9}]
    for name in ("a", "b"):
        save_model_dir(_pruned("llama", steps), tmp_path / name)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_existing_nonempty_output_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        save_model_dir(_pruned("llama", []), out)
    assert (out / "keep.txt").read_text() == "precious"


def test_interrupted_save_leaves_no_output_and_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "out"
    save_model_dir(_pruned("llama", []), out)
    before = (out / "model.safetensors").read_bytes()
    model = _pruned("llama", _nonuniform_steps("llama"))

    class Boom(Exception):
        pass

    def explode(*args, **kwargs):
        raise Boom

    monkeypatch.setattr("surgery.export.hf._fsync_dir", explode)  # fail after the weights are written
    with pytest.raises(Boom):
        save_model_dir(model, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left behind


def test_overwrite_replaces_existing_output(tmp_path):
    out = tmp_path / "out"
    save_model_dir(_pruned("llama", []), out)
    save_model_dir(_pruned("llama", _nonuniform_steps("llama")), out, overwrite=True)
    assert "surgery_layers" in json.loads((out / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_under_a_file_is_refused_before_writing(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        save_model_dir(_pruned("llama", []), tmp_path / "file.txt" / "out")
    assert (tmp_path / "file.txt").read_text() == "x"


def test_apply_does_not_touch_a_deep_copy(tmp_path):
    model = make_model("llama")
    twin = copy.deepcopy(model)
    apply_plan(model, parse_plan({"version": 1, "steps": _nonuniform_steps("llama")}))
    assert twin.config.num_hidden_layers == 3 and len(twin.model.layers) == 3


@pytest.mark.parametrize("steps", [_uniform_steps("llama"), _nonuniform_steps("llama")], ids=["plain", "surgery"])
def test_sharded_output_loads(tmp_path, steps):
    pruned = _pruned("llama", steps)
    save_model_dir(pruned, tmp_path / "out", max_shard_size="40KB", manifest={"version": 1})
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    x = tokens()
    if "surgery_layers" in (tmp_path / "out" / "config.json").read_text():
        reloaded = load_surgery_checkpoint(tmp_path / "out")
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, pruned(x).logits, atol=1e-5, rtol=0)
