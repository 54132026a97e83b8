"""Activation-scaled low rank (ASVD, `low_rank` `"method": "asvd"`), checked against a computation from the definition.

The reference side never calls surgery: activations come from a plain full-model forward with hooks, the
factorisation from numpy's SVD of W diag(mean |x|)^alpha. Against whitened (SVD-LLM) only what is a theorem is
asserted: whitened minimises the output error ||(W - W_r) X||_F over all rank-r matrices, up to its damping term.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import call, one_error_line
from surgery import ops
from surgery.apply import apply_resolution, validate_plan
from surgery.arch import spec_for_config
from surgery.data import TokenBlocks
from surgery.errors import PlanError
from surgery.fingerprint import tokens_fingerprint
from surgery.linalg import asvd_factors
from surgery.plan import parse_plan
from surgery.reconstruct import WHITEN_DAMP, run_data_steps
from tiny_models import VOCAB, make_model, save_tiny

SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def random_blocks(n: int = 12, seq_len: int = 32) -> TokenBlocks:
    ids = torch.randint(3, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(0))
    return TokenBlocks(ids, "random", tokens_fingerprint(ids), ids.numel())


def reader(family: str) -> tuple[str, bool]:
    """The MLP's output projection of layer 1 (its input is untouched by factorising it), and whether it is a
    GPT-2 Conv1D."""
    spec = spec_for_config(make_model(family).config)
    return f"{spec.layer_prefix(1)}.{spec.mlp}.{spec.down}", spec.conv1d


@torch.no_grad()
def inputs_of(model, path: str, blocks: TokenBlocks) -> torch.Tensor:
    """Every calibration token's input row to the module at `path` (float64), from full-model forwards."""
    rows = []
    handle = ops.get_module(model, path).register_forward_hook(
        lambda _m, inp, _out: rows.append(inp[0].reshape(-1, inp[0].shape[-1])))
    for ids in blocks.batches(8):
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return torch.cat(rows).double()


def factorised(original, path: str, rank: int, blocks: TokenBlocks, method: str, **extra) -> torch.Tensor:
    """B @ A (out, in) in float64 after applying one low_rank step of `method` through the plan."""
    step = {"op": "low_rank", "module": path, "rank": rank, **({"method": method} if method != "svd" else {}),
            **extra}
    cal = {"source": blocks.source, "fingerprint": blocks.fingerprint, "tokens": blocks.num_tokens,
           "seq_len": blocks.seq_len}
    model = copy.deepcopy(original)
    resolution = validate_plan(parse_plan({"version": 1, "steps": [step], "calibration": cal}), model)
    apply_resolution(model, resolution)
    report = run_data_steps(original, model, resolution, blocks)
    assert (report.asvd == [path]) == (method == "asvd")
    lr = ops.get_module(model, path)
    return (lr.b.weight.double() @ lr.a.weight.double()).detach()


def dense(model, path: str, conv1d: bool) -> torch.Tensor:
    return ops.linear_weight(ops.get_module(model, path), conv1d).detach().double()


def test_full_rank_reproduces_w_even_with_dead_channels():
    w = torch.randn(24, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = torch.rand(40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s[[3, 17]] = 0.0  # channels never active on the calibration text: floored, not divided by zero
    for alpha in (0.5, 1.0, 2.0):
        b, a = asvd_factors(w, s, 24, alpha)
        assert torch.allclose(b @ a, w, rtol=0, atol=1e-9 * float(w.abs().max())), alpha


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_full_rank_asvd_step_reproduces_the_linear(family):
    original = make_model(family)
    path, conv1d = reader(family)
    w = dense(original, path, conv1d)
    ba = factorised(original, path, min(w.shape), random_blocks(), "asvd")
    assert torch.allclose(ba, w, rtol=0, atol=1e-5 * float(w.abs().max()))  # float32 factors


@pytest.mark.parametrize("family,alpha", [("llama", None), ("gpt2", 1.0)])
def test_truncated_asvd_equals_the_definition(family, alpha):
    """B A = (W S)_r S^-1, S = diag(mean |x|)^alpha, (.)_r the rank-r truncated SVD, computed with numpy."""
    original = make_model(family)
    path, conv1d = reader(family)
    blocks, rank = random_blocks(), 12
    extra = {"alpha": alpha} if alpha is not None else {}
    ba = factorised(original, path, rank, blocks, "asvd", **extra)
    x = inputs_of(original, path, blocks).numpy()
    scale = np.abs(x).mean(0) ** (alpha or 0.5)
    u, sigma, vt = np.linalg.svd(dense(original, path, conv1d).numpy() * scale, full_matrices=False)
    ref = (u[:, :rank] * sigma[:rank]) @ vt[:rank] / scale
    assert np.allclose(ba.numpy(), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_whitened_output_error_is_at_most_asvd_and_plain_at_equal_rank(family):
    """SVD-LLM's theorem: the whitened W_r minimises ||(W - W_r) X||_F^2 over rank-r matrices for the damped Gram
    G + eps I, so err(whitened) <= err(other) + eps (||W - W_other||_F^2 - ||W - W_whitened||_F^2)."""
    original = make_model(family)
    path, conv1d = reader(family)
    blocks, rank = random_blocks(), 10
    x = inputs_of(original, path, blocks)
    w = dense(original, path, conv1d)
    eps = WHITEN_DAMP * float((x * x).sum(0).mean())

    def err(m):
        return float(((x @ (m - w).t()) ** 2).sum())

    whitened = factorised(original, path, rank, blocks, "whitened")
    tol = 1e-5 * err(whitened)  # float32 storage of the factors
    for method in ("asvd", "svd"):
        other = factorised(original, path, rank, blocks, method)
        slack = eps * (float(((w - other) ** 2).sum()) - float(((w - whitened) ** 2).sum()))
        assert err(whitened) <= err(other) + max(slack, 0.0) + tol, method
        assert err(other) > 0


def test_alpha_only_with_asvd_and_asvd_needs_calibration():
    path, _ = reader("llama")
    with pytest.raises(PlanError, match="alpha is only used by method asvd"):
        parse_plan({"version": 1, "steps": [{"op": "low_rank", "module": path, "rank": 4, "alpha": 0.5}]})
    plan = parse_plan({"version": 1, "steps": [{"op": "low_rank", "module": path, "rank": 4, "method": "asvd"}]})
    with pytest.raises(PlanError, match=r"steps\[0\]: needs calibration data"):
        validate_plan(plan, make_model("llama"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("asvd") / "model", "llama")


def test_suggest_asvd_records_fingerprint_and_apply_replays_bit_for_bit(tiny_dir, tmp_path, capsys):
    data = tmp_path / "calib.txt"
    data.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:3000] if SHAKESPEARE.is_file()
                    else "the quick brown fox jumps over the lazy dog. " * 70, encoding="utf-8")
    scores = tmp_path / "sv.safetensors"
    assert call(capsys, "score", tiny_dir, "--out", scores, "--method", "sv")[0] == 0
    plans = {}
    for method in ("asvd", "whitened"):
        plans[method] = tmp_path / f"{method}.json"
        code, _, err = call(capsys, "plan", "suggest", tiny_dir, "--scores", scores, "--low-rank", "mlp",
                            "--rank-keep", 0.5, "--rank-method", method, "--data", data, "--calib-tokens", 512,
                            "--seq-len", 64, "--out", plans[method])
        assert code == 0, err
    doc = json.loads(plans["asvd"].read_text())
    ranks = [s for s in doc["steps"] if s["op"] == "low_rank"]
    assert ranks and all(s["method"] == "asvd" and s["alpha"] == 0.5 for s in ranks)
    assert doc["calibration"]["fingerprint"].startswith("sha256:") and doc["calibration"]["tokens"] == 512
    digests = []
    for name in ("a", "b"):
        code, _, err = call(capsys, "apply", plans["asvd"], "--model", tiny_dir, "--out", tmp_path / name)
        assert code == 0, err
        digests.append(sha(tmp_path / name / "model.safetensors"))
    assert digests[0] == digests[1]
    assert call(capsys, "apply", plans["whitened"], "--model", tiny_dir, "--out", tmp_path / "w")[0] == 0
    assert sha(tmp_path / "w" / "model.safetensors") != digests[0]  # the method is replayed, not defaulted

    # bad input: one line, exit 2, nothing written
    code, _, err = call(capsys, "plan", "suggest", tiny_dir, "--scores", scores, "--low-rank", "mlp",
                        "--rank-keep", 0.5, "--rank-method", "whitened", "--asvd-alpha", 1, "--data", data,
                        "--out", tmp_path / "bad.json")
    assert code == 2 and "--asvd-alpha is only used by --rank-method asvd" in one_error_line(err)
    # whitening on too few tokens: a rank-deficient Gram matrix, refused with the tokens it needs
    code, _, err = call(capsys, "plan", "suggest", tiny_dir, "--scores", scores, "--low-rank", "mlp",
                        "--rank-keep", 0.5, "--rank-method", "whitened", "--data", data, "--calib-tokens", 64,
                        "--seq-len", 32, "--out", tmp_path / "short.json")
    line = one_error_line(err)
    assert code == 2 and "rank-deficient" in line and "need at least 97 tokens" in line, line
    assert not (tmp_path / "bad.json").exists() and not (tmp_path / "short.json").exists()


def test_plan_editor_keeps_asvd_and_its_alpha_across_edits():
    """The TUI's editor writes a loaded plan's asvd steps back as they were (method and alpha), after an edit."""
    from surgery.shapes import shape_from_config
    from workbench.editor import PlanEditor

    model = make_model("llama")
    blocks = random_blocks()
    cal = {"source": blocks.source, "fingerprint": blocks.fingerprint, "tokens": blocks.num_tokens,
           "seq_len": blocks.seq_len}
    asvd = {"op": "low_rank", "module": "model.layers.2.mlp.up_proj", "rank": 8, "method": "asvd", "alpha": 1.5}
    whitened = {"op": "low_rank", "module": "model.layers.1.mlp.up_proj", "rank": 8, "method": "whitened"}
    editor = PlanEditor(shape_from_config(model.config.to_dict()),
                        parse_plan({"version": 1, "calibration": cal, "steps": [asvd, whitened]}))
    editor.toggle_layer(0)
    steps = json.loads(editor.plan().to_json())["steps"]
    assert asvd in steps and whitened in steps and {"op": "drop_layers", "layers": [0]} in steps
