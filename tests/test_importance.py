"""Importance scores on tiny models: each metric against an independent computation (explicit gates, explicit
SVD parametrization, the masking oracle, direct formulas), the score file and its fingerprint checks, the CLI."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from surgery.importance import Cancelled, ScoreFile, ScoreMeta, ScoreMismatch, load_scores, save_scores, score_model
from surgery.importance.layout import model_layout, weight_out_in
from surgery.importance.methods import parse_methods
from surgery.errors import UserError
from tiny_models import FAMILIES, VOCAB, make_model, tokens

# three blocks in batches of 2 and 1: unequal batches check that per-batch weighting is right
BLOCKS = tokens(batch=3, length=10, seed=3)
BATCHES = [BLOCKS[:2], BLOCKS[2:]]


def mean_ce(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def explicit_gate_scores(model):
    """Reference: real gate parameters on every query head, KV group and neuron; autograd per batch."""
    layout = model_layout(model)
    gates, handles = {}, []
    for site in layout.layers:
        h, hd, g = site.heads, site.head_dim, site.group_size
        head = torch.ones(h, requires_grad=True)
        group = torch.ones(site.kv_heads, requires_grad=True)
        neuron = torch.ones(site.width, requires_grad=True)
        gates[site.index] = (head, group, neuron)

        def o_hook(module, args, head=head, group=group, h=h, hd=hd, g=g):
            x = args[0]  # (B, T, H * hd)
            scale = head * group.repeat_interleave(g)  # (H,)
            return ((x.unflatten(-1, (h, hd)) * scale[:, None]).flatten(-2),)

        def down_hook(module, args, neuron=neuron):
            return (args[0] * neuron,)

        handles.append(site.o_proj.register_forward_pre_hook(o_hook))
        handles.append(site.down.register_forward_pre_hook(down_hook))
    sums = {i: [torch.zeros_like(t) for t in ts] for i, ts in gates.items()}
    flat = [t for ts in gates.values() for t in ts]
    try:
        for ids in BATCHES:
            loss = mean_ce(model(input_ids=ids, use_cache=False).logits, ids)
            grads = torch.autograd.grad(loss, flat)
            for k, i in enumerate(gates):
                for j in range(3):
                    sums[i][j] += grads[3 * k + j].abs()
        # the deltas: -d(mean loss over ALL calibration targets)/d gate, all blocks in one batch
        loss = mean_ce(model(input_ids=BLOCKS, use_cache=False).logits, BLOCKS)
        whole = torch.autograd.grad(loss, flat)
        for k, i in enumerate(gates):
            sums[i] += [-whole[3 * k], -whole[3 * k + 2]]
    finally:
        for hd_ in handles:
            hd_.remove()
    return layout, sums


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_gradients_equal_autograd_of_explicit_gates(family):
    model = make_model(family)
    got = score_model(model, BATCHES, "head-grad,kv-group-grad,head-taylor,neuron-taylor,head-delta,neuron-delta")
    layout, ref = explicit_gate_scores(model)
    for site in layout.layers:
        head, group, neuron, head_delta, neuron_delta = ref[site.index]
        torch.testing.assert_close(got[f"{site.attn_path}/head_delta"], head_delta, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got[f"{site.mlp_path}/neuron_delta"], neuron_delta, rtol=1e-4, atol=1e-7)
        assert (head_delta < 0).any() or (neuron_delta < 0).any()  # signed
        torch.testing.assert_close(got[f"{site.attn_path}/head_grad"], head, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got[f"{site.attn_path}/head_taylor"], head, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got[f"{site.attn_path}/kv_group_grad"], group, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got[f"{site.mlp_path}/neuron_taylor"], neuron, rtol=1e-4, atol=1e-7)
        assert head.abs().sum() > 0  # the reference is not trivially zero


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_sv_grad_equals_autograd_through_explicit_svd(family):
    """dL/dsigma over ALL calibration tokens, through W = U diag(sigma) V^T (fused qkv, gate_up, Conv1D)."""
    model = make_model(family)
    got = score_model(model, BATCHES, "sv,sv-grad")
    layout = model_layout(model)
    site = layout.layers[1]
    for path, module in site.linears.items():
        w = weight_out_in(module, layout.conv1d).detach().double()  # (out, in)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sigma = s.clone().requires_grad_(True)
        rebuilt = ((u * sigma) @ vh).float()
        rebuilt = rebuilt.t() if layout.conv1d else rebuilt
        loss = mean_ce(functional_call(model, {f"{path}.weight": rebuilt}, (BLOCKS,), {"use_cache": False}).logits,
                       BLOCKS)  # every block is one batch: the mean over all calibration targets
        (ref,) = torch.autograd.grad(loss, sigma)
        assert rel_err(got[f"{path}/sv_grad"], ref) < 1e-4, path
        torch.testing.assert_close(got[f"{path}/sv"].double(), s, rtol=1e-5, atol=1e-6)
        assert (ref < 0).any() and (ref > 0).any()  # the sign is kept


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_ablation_equals_direct_recomputation(family):
    """head_ablate / layer_ablate (computed with a replayed prefix) equal full recomputations: a head's slice of
    the o_proj input zeroed; a layer dropped under the surgery.mask oracle."""
    from surgery.apply import validate_plan
    from surgery.mask import masked
    from surgery.plan import parse_plan

    model = make_model(family)
    got = score_model(model, BATCHES, "head-ablate,layer-ablate")
    layout = model_layout(model)

    def mean_loss(m):
        total = sum(F.cross_entropy(m(input_ids=b, use_cache=False).logits[:, :-1].flatten(0, 1).float(),
                                    b[:, 1:].flatten(), reduction="sum") for b in BATCHES)
        return float(total) / sum(b.shape[0] * (b.shape[1] - 1) for b in BATCHES)

    with torch.no_grad():
        base = mean_loss(model)
        for layer, head in ((0, 1), (2, 3)):
            site = layout.layers[layer]
            lo, hi = head * site.head_dim, (head + 1) * site.head_dim
            handle = site.o_proj.register_forward_pre_hook(
                lambda m, a: (torch.cat([a[0][..., :lo], torch.zeros_like(a[0][..., lo:hi]), a[0][..., hi:]], -1),))
            expected = mean_loss(model) - base
            handle.remove()
            assert got[f"{site.attn_path}/head_ablate"][head] == pytest.approx(expected, abs=1e-5)
        plan = parse_plan({"version": 1, "steps": [{"op": "drop_layers", "layers": [1]}]})
        with masked(model, validate_plan(plan, model)):
            expected = mean_loss(model) - base
    assert got[f"{layout.model_path}/layer_ablate"][1] == pytest.approx(expected, abs=1e-5)
    assert got[f"{layout.model_path}/layer_ablate"].abs().min() > 0


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_activation_metrics_equal_direct_formulas(family):
    model = make_model(family)
    got = score_model(model, BATCHES, "head-act,neuron-act,neuron-wanda,layer-bi,sv-act")
    layout = model_layout(model)
    site = layout.layers[2]
    seen = {"o": [], "down": [], "q_in": [], "io": []}
    handles = [
        site.o_proj.register_forward_pre_hook(lambda m, a: seen["o"].append(a[0].detach())),
        site.down.register_forward_pre_hook(lambda m, a: seen["down"].append(a[0].detach())),
        site.module.register_forward_hook(lambda m, a, k, o: seen["io"].append((a[0] if a else k["hidden_states"],
                                                                                 o)), with_kwargs=True),
    ]
    with torch.no_grad():
        for ids in BATCHES:
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    o = torch.cat([x.flatten(0, 1) for x in seen["o"]])  # (N, H * hd)
    down_in = torch.cat([x.flatten(0, 1) for x in seen["down"]])  # (N, width)
    n = o.shape[0]
    head_act = o.view(n, site.heads, site.head_dim).norm(dim=-1).mean(0)
    torch.testing.assert_close(got[f"{site.attn_path}/head_act"], head_act, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[f"{site.mlp_path}/neuron_act"], down_in.abs().mean(0), rtol=1e-5, atol=1e-6)
    w_down = weight_out_in(site.down, layout.conv1d).detach()  # (hidden, width)
    wanda = w_down.abs().sum(0) * down_in.norm(dim=0)
    torch.testing.assert_close(got[f"{site.mlp_path}/neuron_wanda"], wanda, rtol=1e-4, atol=1e-5)
    down_path = f"{site.mlp_path}.{layout.spec.down}"
    rms = down_in.pow(2).mean(0).sqrt()
    sv_act = torch.linalg.svdvals((w_down * rms).double()).float()
    torch.testing.assert_close(got[f"{down_path}/sv_act"], sv_act, rtol=1e-4, atol=1e-5)
    cos = torch.cat([F.cosine_similarity(i, o, dim=-1).flatten() for i, o in seen["io"]])
    assert got[f"{layout.model_path}/layer_bi"][2] == pytest.approx(float(1 - cos.mean()), abs=1e-5)


def test_scoring_leaves_the_model_as_it_was():
    model = make_model("llama")
    model.train()
    frozen = model.model.layers[0].self_attn.q_proj.weight
    frozen.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    score_model(model, BATCHES, "all")
    assert model.training and not frozen.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if "layers.0.self_attn.q_proj" not in n)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_progress_reports_tokens_and_cancel_stops():
    model = make_model("qwen2")
    calls = []
    score_model(model, BATCHES, "head-grad,layer-bi", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(20, 30), (30, 30)]
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        score_model(model, BATCHES, "head-grad", cancel=cancel)


def test_unknown_method_is_one_clear_error():
    with pytest.raises(UserError, match="unknown scoring method 'head-gard'"):
        parse_methods("head-grad,head-gard")
    assert [m.name for m in parse_methods("sv_grad, layer-bi")] == ["layer-bi", "sv-grad"]


def meta(**kw):
    base = dict(methods=["head-grad"], model_source="tiny", model_fingerprint="sha256:" + "a" * 64,
                data_source="wiki", data_fingerprint="sha256:" + "b" * 64, tokens=30, seq_len=10, batch_size=2,
                library_version="0.1.0", versions={"torch": torch.__version__})
    return ScoreMeta(**{**base, **kw})


def test_score_file_round_trip_and_fingerprint_checks(tmp_path):
    tensors = {"model.layers.0.self_attn/head_grad": torch.arange(4.0), "model/layer_bi": torch.ones(3)}
    path = save_scores(tmp_path / "s.safetensors", ScoreFile(meta(), tensors))
    loaded = load_scores(path, model_fingerprint="sha256:" + "a" * 64, data_fingerprint="sha256:" + "b" * 64)
    assert loaded.meta == meta()
    assert loaded.metrics() == {"head_grad", "layer_bi"}
    torch.testing.assert_close(loaded.get("model.layers.0.self_attn", "head_grad"), torch.arange(4.0))
    with pytest.raises(ScoreMismatch, match="computed for model"):
        load_scores(path, model_fingerprint="sha256:" + "c" * 64)
    with pytest.raises(ScoreMismatch, match="computed for data"):
        load_scores(path, data_fingerprint="sha256:" + "c" * 64)
    forced = load_scores(path, model_fingerprint="sha256:" + "c" * 64, force=True)
    assert forced.meta.model_fingerprint == "sha256:" + "a" * 64
    from safetensors.torch import save_file

    save_file({"x": torch.ones(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a workbench score file"):
        load_scores(tmp_path / "other.safetensors")
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left nothing behind


# -- CLI --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with a character-level tokenizer whose ids fit its 128-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_model("llama").save_pretrained(path)
    vocab = {"[UNK]": 0, **{chr(c): c - 31 for c in range(32, 127)}, "\n": 96}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    assert max(vocab.values()) < VOCAB
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\n" * 20)
    return path


def test_cli_score_writes_a_checked_file(capsys, tmp_path, model_dir, text_file):
    from workbench.cli import run

    out = tmp_path / "scores.safetensors"
    code = run(["score", str(model_dir), "--data", str(text_file), "--tokens", "256", "--seq-len", "32",
                "--batch-size", "3", "--method", "head-grad,neuron-taylor,layer-bi,sv,sv-grad", "--out", str(out),
                "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["tokens"] == 256 and summary["seq_len"] == 32 and summary["batch_size"] == 3
    assert summary["metrics"] == ["head_grad", "layer_bi", "neuron_taylor", "sv", "sv_grad"]
    scores = load_scores(out, model_fingerprint=summary["model_fingerprint"])
    assert scores.get("model.layers.2.mlp.down_proj", "sv_grad").shape == (64,)
    assert scores.get("model", "layer_bi").shape == (3,)
    assert scores.meta.data_fingerprint == summary["data_fingerprint"]


def test_cli_score_bad_input_is_one_line(capsys, tmp_path, model_dir, text_file):
    from workbench.cli import run

    code = run(["score", str(model_dir), "--data", str(text_file), "--method", "head-gard",
                "--out", str(tmp_path / "s.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown scoring method" in err[0]
    code = run(["score", str(model_dir), "--method", "head-grad", "--out", str(tmp_path / "s.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--data" in err[0]
    assert not (tmp_path / "s.safetensors").exists()


# -- device maps (a model spread over devices; on this CPU machine every entry is "cpu") -------------------------
DEVICE_MAP_METHODS = "head-grad,kv-group-grad,neuron-taylor,head-delta,head-act,neuron-wanda,layer-bi,sv-act,sv-grad"


def cpu_device_map(model) -> dict[str, str]:
    """{module path: "cpu"} at the granularity accelerate uses for a decoder: embedding, each layer, norm, head."""
    layout = model_layout(model)
    names = [n for n, _ in model.named_children()]
    inner = layout.model_path
    mapping = {f"{inner}.{n}": "cpu" for n, m in model.get_submodule(inner).named_children() if n != "layers"}
    mapping.update({site.path: "cpu" for site in layout.layers})
    mapping.update({n: "cpu" for n in names if n != inner})
    return mapping


def test_device_map_scores_equal_the_plain_path(model_dir, text_file):
    """device_map="auto" (all CPU here) and a dict map through accelerate's hooks give the plain path's scores."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    from surgery.data import load_blocks
    from surgery.importance import score_source
    from surgery.loading import load_tokenizer

    kwargs = dict(tokens=128, seq_len=32, batch_size=3)
    plain = score_source(str(model_dir), str(text_file), DEVICE_MAP_METHODS, **kwargs)
    auto = score_source(str(model_dir), str(text_file), DEVICE_MAP_METHODS, device_map="auto", **kwargs)
    assert plain.tensors.keys() == auto.tensors.keys()
    for key, value in plain.tensors.items():
        torch.testing.assert_close(auto.tensors[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert plain.meta.device == "cpu" and auto.meta.device == "cpu"

    # an explicit map, dispatched with accelerate's hooks forced on (what a multi-GPU map installs on every block)
    batches = list(load_blocks(str(text_file), load_tokenizer(model_dir), 32, 128).batches(3))
    methods = DEVICE_MAP_METHODS + ",head-ablate,layer-ablate"
    reference = score_model(AutoModelForCausalLM.from_pretrained(model_dir), batches, methods)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = dispatch_model(model, cpu_device_map(model), force_hooks=True)
    assert hasattr(model.get_submodule("model.layers.0"), "_hf_hook"), "the hooks under test are installed"
    hooked = score_model(model, batches, methods)
    assert hooked.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(hooked[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_offloaded_weights_are_refused(model_dir, tmp_path):
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    from surgery.importance.pipeline import check_on_devices

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    check_on_devices(model)  # all weights on a device: fine
    mapping = cpu_device_map(model)
    mapping["model.layers.1"] = "disk"
    offloaded = len(list(model.get_submodule("model.layers.1").parameters()))
    model = dispatch_model(model, mapping, offload_dir=str(tmp_path / "offload"))
    with pytest.raises(UserError, match=f"offloads {offloaded} weight"):
        check_on_devices(model)


def test_cli_device_flags_are_checked_before_loading(capsys, tmp_path, model_dir, text_file):
    from cli_helpers import call, one_error_line

    base = ["score", model_dir, "--data", text_file, "--method", "head-grad", "--out", tmp_path / "s.safetensors"]
    code, _, err = call(capsys, *base, "--device", "cpu", "--device-map", "auto")
    assert code == 2 and "--device-map" in one_error_line(err)
    code, _, err = call(capsys, *base, "--device-map", "everywhere")
    assert code == 2 and "unknown device map" in one_error_line(err)
    if not torch.cuda.is_available():
        code, _, err = call(capsys, *base, "--device", "cuda")
        assert code == 2 and "CUDA is not available" in one_error_line(err)
    assert not (tmp_path / "s.safetensors").exists()
    code, out, err = call(capsys, *base, "--device-map", "auto", "--tokens", "64", "--seq-len", "32", "--json")
    assert code == 0, err
    if not torch.cuda.is_available():
        assert json.loads(out)["device"] == "cpu"  # "auto" on a machine without GPUs


def test_surgery_checkpoint_loads_with_a_device_map(tmp_path):
    """Checkpoints built on CPU (per-layer shapes, low-rank factors) are spread with accelerate's dispatch_model."""
    from surgery.apply import apply_plan
    from surgery.export import save_model_dir
    from surgery.loading import load_model
    from surgery.plan import parse_plan

    model = make_model("llama")
    plan = parse_plan({"version": 1, "steps": [{"op": "prune_heads", "layer": 0, "heads": [1, 3]},
                                               {"op": "low_rank", "module": "model.layers.1.mlp.down_proj",
                                                "rank": 8}]})
    pruned, _ = apply_plan(model, plan)
    save_model_dir(pruned, tmp_path / "ckpt")
    plain = load_model(str(tmp_path / "ckpt")).model
    spread = load_model(str(tmp_path / "ckpt"), device_map="auto").model
    assert "surgery_layers" in spread.config.to_dict()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(spread(ids).logits, plain(ids).logits)
    with pytest.raises(UserError, match="not both"):
        load_model(str(tmp_path / "ckpt"), device="cpu", device_map="auto")


def test_scoring_reports_each_phase_with_its_own_progress():
    """The singular-value phase has its own count (matrices), instead of a token bar stuck at 100% (issue 16)."""
    from surgery.importance import score_model
    from tiny_models import make_model, tokens

    model = make_model("llama")
    phases, seen = [], []
    score_model(model, [tokens(2, 8)], "head-grad,sv-grad", phase=lambda *a: phases.append(a),
                progress=lambda done, total: seen.append((len(phases), done, total)))
    matrices = 3 * 7  # q k v o gate up down in each of 3 layers
    assert phases == [("passes", 16, "tokens"), ("singular values", matrices, "matrices")]
    assert [d for p, d, t in seen if p == 1] == [16]
    assert [d for p, d, t in seen if p == 2] == list(range(1, matrices + 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_grad_equals_autograd_of_an_explicit_layer_gate(family):
    """layer_grad: a real gate xi_l per decoder layer, h_out -> h_in + xi_l (h_out - h_in) (xi_l = 0 drops the
    layer); sum over batches of |dL_b/dxi_l| by autograd."""
    model = make_model(family)
    got = score_model(model, BATCHES, "layer-grad,head-grad")
    layout = model_layout(model)
    xi = torch.ones(len(layout.layers), requires_grad=True)

    def gate(i):
        def hook(module, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            gated = h_in + xi[i] * (h_out - h_in)
            return (gated, *out[1:]) if isinstance(out, tuple) else gated
        return hook

    handles = [s.module.register_forward_hook(gate(s.index), with_kwargs=True) for s in layout.layers]
    ref = torch.zeros_like(xi)
    try:
        for ids in BATCHES:
            ref += torch.autograd.grad(mean_ce(model(input_ids=ids, use_cache=False).logits, ids), xi)[0].abs()
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got[f"{layout.model_path}/layer_grad"], ref, rtol=1e-4, atol=1e-7)
    assert ref.min() > 0


def test_magnitude_scores_read_a_low_rank_linear_as_its_product():
    """A surgery checkpoint's LowRankLinear has a zero-length `weight`: the magnitude baselines use B @ A."""
    from surgery.apply import apply_plan
    from surgery.modules import LowRankLinear
    from surgery.plan import parse_plan

    cut = make_model("llama")
    apply_plan(cut, parse_plan({"version": 1, "steps": [
        {"op": "low_rank", "module": "model.layers.0.self_attn.q_proj", "rank": 5},
        {"op": "low_rank", "module": "model.layers.1.mlp.down_proj", "rank": 7}]}))
    dense = make_model("llama")
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        low = cut.get_submodule(path)
        assert isinstance(low, LowRankLinear)
        dense.get_submodule(path).weight.data = low.b.weight @ low.a.weight
    got = score_model(cut, [], "head-magnitude,neuron-magnitude")
    want = score_model(dense, [], "head-magnitude,neuron-magnitude")
    assert got.keys() == want.keys() and got
    for key in got:
        torch.testing.assert_close(got[key], want[key])
