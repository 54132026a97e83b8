"""Training-free reconstruction and whitened low rank (surgery.reconstruct), checked against independent solves.

The reference side never calls surgery.reconstruct: activations come from plain full-model forwards with hooks,
refits from `torch.linalg.lstsq` on the ridge-augmented system, whitened factors from the SVD of W X^T.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from cli_helpers import call, one_error_line
from surgery import ops
from surgery.apply import apply_resolution, validate_plan
from surgery.arch import spec_for_config
from surgery.data import TokenBlocks
from surgery.fingerprint import tokens_fingerprint
from surgery.plan import parse_plan
from surgery.reconstruct import run_data_steps
from tiny_models import FAMILIES, VOCAB, make_model, save_tiny

DATA = Path(__file__).parents[2] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
RIDGE = 1e-3


def blocks_of(n: int = 16, seq_len: int = 32, seed: int = 0) -> TokenBlocks:
    ids = torch.randint(3, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    return TokenBlocks(ids, "random", tokens_fingerprint(ids), ids.numel())


def plan_for(blocks: TokenBlocks, steps: list[dict], **recon) -> dict:
    cal = {"source": blocks.source, "fingerprint": blocks.fingerprint, "tokens": blocks.num_tokens,
           "seq_len": blocks.seq_len}
    return {"version": 1, "calibration": cal, "steps": [*steps, {"op": "reconstruct", "ridge": RIDGE, **recon}]}


def cuts(spec) -> list[dict]:
    """Heads from layer 0, neurons from layers 1 and 2 (tiny models: 4 heads / 2 KV groups, 96 neurons)."""
    return [{"op": "prune_heads", "layer": 0, "heads": [0, 2]},
            {"op": "prune_neurons", "layer": 1, "neurons": list(range(0, 96, 2))},
            {"op": "prune_neurons", "layer": 2, "neurons": list(range(40))}]


@torch.no_grad()
def activations(model, paths: list[str], blocks: TokenBlocks, batch: int = 8) -> dict[str, tuple]:
    """(inputs, outputs) of each module in `paths`, rows = every calibration token, float64, via a full forward."""
    got = {p: ([], []) for p in paths}

    def hook(path):
        def grab(_m, inputs, output):  # returns None: the output is left as it is
            got[path][0].append(inputs[0].reshape(-1, inputs[0].shape[-1]))
            got[path][1].append(output.reshape(-1, output.shape[-1]))
        return grab

    handles = [ops.get_module(model, p).register_forward_hook(hook(p)) for p in paths]
    for ids in blocks.batches(batch):
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {p: (torch.cat(a).double(), torch.cat(y).double()) for p, (a, y) in got.items()}


def ridge_lstsq(a: torch.Tensor, y: torch.Tensor, bias: bool, prior: torch.Tensor) -> torch.Tensor:
    """Independent ridge least squares toward `prior` (out, in): lstsq on [A; sqrt(lam) I] against
    [Y; sqrt(lam) prior^T], bias column unpenalised."""
    n_in = a.shape[1]
    lam = RIDGE * float((a * a).sum(0).mean())
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    penalty = torch.zeros(n_in, a.shape[1], dtype=a.dtype)
    penalty[:, :n_in] = lam**0.5 * torch.eye(n_in, dtype=a.dtype)
    big_a = torch.cat([a, penalty])
    big_y = torch.cat([y, lam**0.5 * prior[:, :n_in].t()])
    return torch.linalg.lstsq(big_a, big_y, driver="gelsd").solution.t()  # (out, in[+1])


def weight_and_bias(module, conv1d: bool) -> torch.Tensor:
    w = ops.linear_weight(module, conv1d).detach().double()
    b = getattr(module, "bias", None)
    return torch.cat([w, b.detach().double()[:, None]], 1) if b is not None else w


def sq_error(w: torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> float:
    if w.shape[1] == a.shape[1] + 1:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    return float(((a @ w.t() - y) ** 2).sum())


def readers(spec) -> list[str]:
    return [f"{spec.layer_prefix(0)}.{spec.attn}.{spec.o}", f"{spec.layer_prefix(1)}.{spec.mlp}.{spec.down}",
            f"{spec.layer_prefix(2)}.{spec.mlp}.{spec.down}"]


@pytest.mark.parametrize("family", FAMILIES)
def test_refit_equals_independent_lstsq_on_pruned_prefix_inputs(family):
    """inputs="pruned": each refit equals lstsq of the original outputs on the final model's own inputs."""
    original = make_model(family)
    spec = spec_for_config(original.config)
    blocks = blocks_of()
    model = copy.deepcopy(original)
    resolution = validate_plan(parse_plan(plan_for(blocks, cuts(spec), inputs="pruned")), model)
    apply_resolution(model, resolution)
    cut_only = copy.deepcopy(model)
    report = run_data_steps(original, model, resolution, blocks)
    assert [f.module for f in report.fits] == readers(spec)

    want = activations(original, readers(spec), blocks)
    got = activations(model, readers(spec), blocks)
    for path in readers(spec):
        a, y = got[path][0], want[path][1]
        refit = weight_and_bias(ops.get_module(model, path), spec.conv1d)
        cut = weight_and_bias(ops.get_module(cut_only, path), spec.conv1d)
        ref = ridge_lstsq(a, y, bias=refit.shape[1] > a.shape[1], prior=cut)
        assert torch.allclose(refit, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max())), path
        assert sq_error(refit, a, y) <= sq_error(cut, a, y), path  # the refit never does worse on its data
        assert sq_error(refit, a, y) < 0.95 * sq_error(cut, a, y), path  # ... and here clearly better


def test_refit_from_original_inputs_equals_lstsq_on_sliced_original_activations():
    """inputs="original" with only neurons cut: down_proj's inputs are the original's kept neurons, exactly."""
    original = make_model("llama")
    spec = spec_for_config(original.config)
    blocks = blocks_of()
    steps = [{"op": "prune_neurons", "layer": 1, "neurons": list(range(0, 96, 3))}]
    model = copy.deepcopy(original)
    resolution = validate_plan(parse_plan(plan_for(blocks, steps, inputs="original")), model)
    apply_resolution(model, resolution)
    run_data_steps(original, model, resolution, blocks)
    path = f"{spec.layer_prefix(1)}.{spec.mlp}.{spec.down}"
    a, y = activations(original, [path], blocks)[path]
    kept = [i for i in range(96) if i % 3]
    w = ops.linear_weight(ops.get_module(original, path), False).detach().double()
    ref = ridge_lstsq(a[:, kept], y, bias=False, prior=w[:, kept])
    refit = weight_and_bias(ops.get_module(model, path), False)
    assert torch.allclose(refit, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_whitened_low_rank_beats_plain_svd_and_equals_projection_of_w_x(family):
    """Whitened factors: B A = U_r U_r^T W (U from the SVD of W X^T), with output error <= the plain SVD's."""
    original = make_model(family)
    spec = spec_for_config(original.config)
    blocks = blocks_of()
    names = spec.mlp_linears[:-1] if spec.gate_up or spec.family == "gpt2" else (spec.up,)
    path = f"{spec.layer_prefix(1)}.{spec.mlp}.{names[0]}"
    rank = 10
    step = {"op": "low_rank", "module": path, "rank": rank}
    plan = {"version": 1, "steps": [{**step, "method": "whitened"}],
            "calibration": plan_for(blocks, [])["calibration"]}
    model = copy.deepcopy(original)
    resolution = validate_plan(parse_plan(plan), model)
    apply_resolution(model, resolution)
    report = run_data_steps(original, model, resolution, blocks)
    assert report.whitened == [path]
    plain = copy.deepcopy(original)
    apply_resolution(plain, validate_plan(parse_plan({"version": 1, "steps": [step]}), plain))

    x, y = activations(original, [path], blocks)[path]  # layer 1's input is untouched by the factorisation
    lr = ops.get_module(model, path)
    ba = (lr.b.weight.double() @ lr.a.weight.double()).detach()
    w = ops.linear_weight(ops.get_module(original, path), spec.conv1d).detach().double()
    u = torch.linalg.svd(w @ x.t(), full_matrices=False)[0][:, :rank]
    assert torch.allclose(ba, u @ u.t() @ w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))
    pl = ops.get_module(plain, path)
    err = lambda m: float(((x @ (m - w).t()) ** 2).sum())  # noqa: E731
    assert err(ba) <= err((pl.b.weight.double() @ pl.a.weight.double()).detach())


def calib_file(tmp_path: Path, chars: int) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:chars] if SHAKESPEARE.is_file()
                    else ("the quick brown fox jumps over the lazy dog. " * 200)[:chars], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("recon") / "model", "llama")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_suggest_reconstruct_then_apply_replays_byte_identical(tiny_dir, tmp_path, capsys):
    data = calib_file(tmp_path, 3000)
    scores = tmp_path / "scores.safetensors"
    code, _, err = call(capsys, "score", tiny_dir, "--data", data, "--out", scores, "--tokens", 1024, "--seq-len",
                        64, "--method", "head-grad,neuron-taylor")
    assert code == 0, err
    plan = tmp_path / "plan.json"
    code, _, err = call(capsys, "plan", "suggest", tiny_dir, "--scores", scores, "--target-params", 0.9,
                        "--reconstruct", "--data", data, "--calib-tokens", 1024, "--seq-len", 64, "--out", plan)
    assert code == 0, err
    text = plan.read_text()
    assert '"op": "reconstruct"' in text and '"calibration"' in text
    outs = []
    for name in ("a", "b"):
        code, _, err = call(capsys, "apply", plan, "--model", tiny_dir, "--out", tmp_path / name)
        assert code == 0, err
        outs.append(sha(tmp_path / name / "model.safetensors"))
    assert outs[0] == outs[1]
    # the same plan without the reconstruct step gives other weights
    stripped = tmp_path / "cut.json"
    doc = json.loads(text)
    doc["steps"] = [s for s in doc["steps"] if s["op"] != "reconstruct"]
    stripped.write_text(json.dumps(doc))
    code, _, err = call(capsys, "apply", stripped, "--model", tiny_dir, "--out", tmp_path / "c")
    assert code == 0, err
    assert sha(tmp_path / "c" / "model.safetensors") != outs[0]

    # other data than the plan was calibrated on: refused, one line, nothing written
    data.write_text(data.read_text()[::-1])
    code, _, err = call(capsys, "apply", plan, "--model", tiny_dir, "--out", tmp_path / "d")
    assert code == 2 and "calibration data" in one_error_line(err)
    assert not (tmp_path / "d").exists()


def test_calibration_too_short_is_refused_with_the_tokens_needed(tiny_dir, tmp_path, capsys):
    data = calib_file(tmp_path, 3000)
    scores = tmp_path / "scores.safetensors"
    assert call(capsys, "score", tiny_dir, "--data", data, "--out", scores, "--tokens", 512, "--seq-len", 64,
                "--method", "neuron-taylor")[0] == 0
    plan = tmp_path / "plan.json"
    code, _, err = call(capsys, "plan", "suggest", tiny_dir, "--scores", scores, "--neurons", "10%",
                        "--reconstruct", "--data", data, "--calib-tokens", 64, "--seq-len", 32, "--out", plan)
    line = one_error_line(err)
    assert code == 2 and "rank-deficient" in line, line
    assert int(re.search(r"need at least (\d+) tokens", line).group(1)) > 64  # the kept neurons + the bias-free 1
    assert not plan.exists()


def test_plan_editor_keeps_calibration_reconstruct_and_whitened_steps():
    """Opening a calibrated plan in the TUI's editor and editing marks never drops its data-driven parts."""
    from surgery.shapes import shape_from_config
    from workbench.editor import PlanEditor

    model = make_model("llama")
    blocks = blocks_of()
    doc = plan_for(blocks, [{"op": "prune_neurons", "layer": 1, "neurons": [0, 1]},
                            {"op": "low_rank", "module": "model.layers.2.mlp.up_proj", "rank": 8,
                             "method": "whitened"}], inputs="original")
    editor = PlanEditor(shape_from_config(model.config.to_dict()), parse_plan(doc))
    editor.toggle_layer(0)
    out = json.loads(editor.plan().to_json())
    assert out["calibration"] == doc["calibration"] | {"batch_size": 8}
    assert {"op": "reconstruct", "inputs": "original", "ridge": RIDGE} in out["steps"]
    assert {"op": "low_rank", "module": "model.layers.2.mlp.up_proj", "rank": 8, "method": "whitened"} in out["steps"]
    assert {"op": "drop_layers", "layers": [0]} in out["steps"]
