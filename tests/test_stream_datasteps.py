"""Streaming apply of plans with data-driven steps (surgery.stream.datasteps): reconstruct and whitened / asvd low
rank fitted layer by layer, their tensors spilled and streamed, against the in-memory apply of the same plan
(load, cut, fit on the whole model, save_pretrained): every output file byte for byte, the same calibration report.

The in-memory fit is itself checked against independent solves (tests/test_reconstruct.py, test_lowrank_asvd.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
from cli_helpers import call, one_error_line
from test_stream_apply import assert_same_dirs
from tiny_models import FAMILIES, make_config, save_tiny

from surgery.arch import spec_for_config
from surgery.data import load_blocks
from surgery.errors import UserError
from surgery.loading import load_tokenizer
from surgery.pipeline import apply_to_source
from surgery.plan import parse_plan

DATA = Path(__file__).parents[2] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
SEQ, TOKENS = 32, 320  # the widest fitted input of a tiny model has 96 inputs: 320 tokens give full-rank Grams


def calib_file(tmp_path: Path, source: Path = SHAKESPEARE, chars: int = 6000) -> Path:
    if not source.is_file():
        pytest.skip(f"no calibration text at {source}")
    path = tmp_path / "calib.txt"
    path.write_text(source.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return path


def calibration(src: Path, data: Path, seq_len: int = SEQ, tokens: int = TOKENS, batch_size: int = 3) -> dict:
    blocks = load_blocks(str(data), load_tokenizer(src), seq_len, tokens)
    return {"source": str(data), "fingerprint": blocks.fingerprint, "tokens": blocks.num_tokens, "seq_len": seq_len,
            "batch_size": batch_size}


def mixed_steps(family: str, inputs: str = "pruned") -> list[dict]:
    """Heads + a whitened factor in layer 0, neurons + an asvd factor in layer 1, a plain svd factor in layer 1's
    MLP, layer 2 dropped (GPT-2: its attention), reconstruct."""
    spec = spec_for_config(make_config(family))
    mlp_in = spec.gate_up or spec.up
    last = {"op": "drop_layers", "layers": [2]} if family != "gpt2" else {"op": "drop_attention", "layer": 2}
    return [
        {"op": "prune_heads", "layer": 0, "heads": [0, 2]},
        {"op": "low_rank", "module": f"{spec.layer_prefix(0)}.{spec.mlp}.{mlp_in}", "rank": 9, "method": "whitened"},
        {"op": "prune_neurons", "layer": 1, "neurons": list(range(0, 96, 2))},
        {"op": "low_rank", "module": f"{spec.layer_prefix(1)}.{spec.attn}.{spec.attn_linears[0]}", "rank": 7,
         "method": "asvd"},
        {"op": "low_rank", "module": f"{spec.layer_prefix(1)}.{spec.mlp}.{mlp_in}", "rank": 5},
        last,
        {"op": "reconstruct", "ridge": 1e-3, "inputs": inputs},
    ]  # fmt: skip


def both_paths(tmp_path: Path, src: Path, doc: dict, **kw):
    """The same plan applied in memory and streaming: identical directories, and the manifests say which ran."""
    plan = parse_plan(doc)
    mem = apply_to_source(plan, tmp_path / "mem", str(src), stream=False, **kw)
    streamed = apply_to_source(plan, tmp_path / "stream", str(src), stream=True, **kw)
    assert mem.manifest["apply"] == {"path": "in_memory"}
    applied = streamed.manifest["apply"]
    assert applied["path"] == "stream" and applied["data_steps"] == "layer_by_layer" and applied["spill_bytes"] > 0
    assert streamed.manifest["calibration"] == mem.manifest["calibration"]  # the same fits, bit for bit
    assert_same_dirs(tmp_path / "mem", tmp_path / "stream")  # every file but surgery.json's apply block
    assert not list(tmp_path.glob("**/.spill")) and not list(tmp_path.glob(".*.tmp-*"))
    return streamed


# each family once, the two input modes shared out (the suite's time)
CASES = [(family, "pruned" if i % 2 == 0 else "original") for i, family in enumerate(FAMILIES)]


@pytest.mark.parametrize("family, inputs", CASES)
def test_mixed_data_plan_streams_byte_identical_to_in_memory(tmp_path, family, inputs):
    src = save_tiny(tmp_path / "src", family)
    doc = {"version": 1, "calibration": calibration(src, calib_file(tmp_path)), "steps": mixed_steps(family, inputs)}
    streamed = both_paths(tmp_path, src, doc)
    report = streamed.manifest["calibration"]
    assert len(report["whitened"]) == 1 and len(report["asvd"]) == 1 and len(report["refits"]) == 2
    # the fitted tensors are not the plain cut's: the same plan without its data steps writes other bytes
    plain = [s for s in mixed_steps(family, inputs) if s["op"] != "reconstruct" and "method" not in s]
    apply_to_source(parse_plan({"version": 1, "steps": plain}), tmp_path / "plain", str(src), stream=True)
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() != \
        (tmp_path / "stream" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("steps", [
    [{"op": "prune_neurons", "layer": 2, "neurons": list(range(50))}, {"op": "reconstruct", "inputs": "original"}],
    [{"op": "low_rank", "module": "model.layers.1.self_attn.o_proj", "rank": 6, "method": "whitened"}],
    [{"op": "low_rank", "module": "model.layers.0.mlp.down_proj", "rank": 6, "method": "asvd", "alpha": 0.5},
     {"op": "drop_layers", "layers": [1]}],
], ids=["reconstruct-original", "whitened", "asvd"])
def test_each_data_step_alone_streams_byte_identical(tmp_path, steps):
    src = save_tiny(tmp_path / "src", "llama")
    both_paths(tmp_path, src, {"version": 1, "calibration": calibration(src, calib_file(tmp_path)), "steps": steps})


def test_bf16_sharded_input_and_output(tmp_path):
    """bf16 weights in several input shards, written in several output shards: the fit runs in bf16 as the loaded
    model does, and each spilled tensor lands where save_pretrained puts it (the index too)."""
    import torch
    from tiny_models import make_model, tiny_tokenizer

    from surgery.export import save_model_dir
    from surgery.loading import load_model
    from surgery.pipeline import calibration_blocks, validate_for_source
    from surgery.reconstruct import apply_calibrated
    from surgery.stream.apply import stream_apply_source

    src = tmp_path / "src"
    make_model("llama").to(torch.bfloat16).save_pretrained(src, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(src)
    plan = parse_plan({"version": 1, "calibration": calibration(src, calib_file(tmp_path)),
                       "steps": mixed_steps("llama")})
    v = validate_for_source(plan, str(src))
    loaded = load_model(src, dtype="auto")  # as apply loads it
    assert loaded.model.dtype == torch.bfloat16
    apply_calibrated(loaded.model, v.resolution, loaded.tokenizer, blocks=calibration_blocks(v))
    save_model_dir(loaded.model, tmp_path / "mem", tokenizer=loaded.tokenizer, max_shard_size="30KB")
    stream_apply_source(plan, v, tmp_path / "stream", required=True, max_shard_size="30KB")
    (tmp_path / "stream" / "surgery.json").unlink()
    assert len(list((tmp_path / "stream").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "stream" / "model.safetensors.index.json").is_file()
    assert_same_dirs(tmp_path / "mem", tmp_path / "stream")
    # cast on the way (bf16 stored, fp32 written: what `workbench compress` asks): the fit runs in fp32 on both paths
    both_paths(tmp_path / "f32", src, plan.model_dump(exclude_none=True), dtype="float32")


def test_progress_per_layer_and_cancel_leaves_nothing(tmp_path):
    src = save_tiny(tmp_path / "src", "llama")
    plan = parse_plan({"version": 1, "calibration": calibration(src, calib_file(tmp_path)),
                       "steps": mixed_steps("llama")})
    seen: list[str] = []
    apply_to_source(plan, tmp_path / "out", str(src), stream=True, progress=seen.append)
    fits = [m for m in seen if m.startswith("fitting data steps layer by layer ")]
    assert fits == [f"fitting data steps layer by layer {i}/2" for i in (1, 2)]  # layer 2 is dropped: 2 to fit
    streaming = [i for i, m in enumerate(seen) if m.startswith("streaming tensors ")]
    assert streaming and seen.index(fits[-1]) < streaming[0]  # fitted first, then streamed

    cancel = threading.Event()

    def cancel_after_first_layer(message: str) -> None:
        if message.endswith("1/2"):
            cancel.set()

    from surgery.metrics.common import Cancelled

    with pytest.raises(Cancelled):
        apply_to_source(plan, tmp_path / "cancelled", str(src), stream=True, progress=cancel_after_first_layer,
                        cancel=cancel)
    assert not (tmp_path / "cancelled").exists() and not list(tmp_path.glob(".cancelled*"))


def test_a_failing_fit_leaves_no_output_and_no_spill(tmp_path, monkeypatch):
    from surgery.stream import datasteps

    src = save_tiny(tmp_path / "src", "llama")
    plan = parse_plan({"version": 1, "calibration": calibration(src, calib_file(tmp_path)),
                       "steps": mixed_steps("llama")})
    spills = []
    real = datasteps.SpilledFit._save

    def save_then_fail(self, plan, position, block):
        real(self, plan, position, block)
        spills.extend(Path(plan.sources[k].file) for k in plan.sources if k.startswith(datasteps.SPILL_KEY))
        if position == 1:
            raise OSError("disk on fire")

    monkeypatch.setattr(datasteps.SpilledFit, "_save", save_then_fail)
    with pytest.raises(OSError, match="disk on fire"):
        apply_to_source(plan, tmp_path / "out", str(src), stream=True)
    assert spills and not any(p.exists() for p in spills)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_free_space_check_counts_the_spill(tmp_path, monkeypatch):
    """Refused at one byte under shards + tokenizer + margin + spill, before anything is written; applied at it."""
    import surgery.stream.apply as stream_apply
    from surgery.loading import parse_dtype, read_config
    from surgery.resolve import resolve_plan
    from surgery.shapes import shape_from_config
    from surgery.stream.datasteps import SpilledFit, spill_bytes
    from surgery.stream.tokenizer import cached_tokenizer_files

    src = save_tiny(tmp_path / "src", "llama")
    plan = parse_plan({"version": 1, "calibration": calibration(src, calib_file(tmp_path)),
                       "steps": mixed_steps("llama")})
    cfg = read_config(src)
    resolution = resolve_plan(plan, shape_from_config(cfg))
    splan = stream_apply.build_stream_plan(src, cfg, resolution, parse_dtype("auto", cfg))
    fit = SpilledFit(splan, resolution)
    assert fit.spill_bytes == spill_bytes(fit.groups) > 0
    needed = (splan.bytes_written + sum(p.stat().st_size for p in cached_tokenizer_files(src))
              + stream_apply._SMALL_FILES_MARGIN + fit.spill_bytes)
    real = shutil.disk_usage
    monkeypatch.setattr(stream_apply.shutil, "disk_usage", lambda p: real(p)._replace(free=needed - 1))
    with pytest.raises(UserError, match="not enough disk space"):
        apply_to_source(plan, tmp_path / "out", str(src), stream=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    monkeypatch.setattr(stream_apply.shutil, "disk_usage", lambda p: real(p)._replace(free=needed))
    result = apply_to_source(plan, tmp_path / "out", str(src), stream=True)
    assert result.manifest["apply"]["spill_bytes"] == fit.spill_bytes
    # the dry run (headers only, no fit) plans the same output bytes
    from surgery.stream.dry import dry_run_source

    dry = dry_run_source(plan, str(src))
    assert dry["path"] == "stream" and dry["bytes_written"] == (tmp_path / "out" / "model.safetensors").stat().st_size
    # what the spill held: exactly the fitted tensors, the sizes the check counted
    spilled = {r.name for reads in fit.groups.values() for r in reads}
    assert spilled == {
        "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.up_proj.a.weight",
        "model.layers.0.mlp.up_proj.b.weight", "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.a.weight", "model.layers.1.self_attn.q_proj.b.weight",
    }  # fmt: skip
    # the dry run marks exactly those as fitted at apply time, and says so in a note
    assert {r["name"] for r in dry["reads"] if r.get("fitted")} == spilled
    assert "fit on the calibration" in dry["notes"][-1]


def test_cli_stream_forced_with_a_step_that_cannot_stream(tmp_path, capsys):
    """A data plan with a step the streaming applier cannot do (experts): one line naming the step and why, exit 2,
    nothing written; without --stream the same plan applies in memory and the manifest says so."""
    from test_prune_experts import moe_model
    from tiny_models import tiny_tokenizer

    src = tmp_path / "moe"
    moe_model("qwen3_moe").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    doc = {"version": 1, "calibration": calibration(src, calib_file(tmp_path)), "steps": [
        {"op": "prune_experts", "layer": 0, "experts": [1, 4]}, {"op": "prune_heads", "layer": 0, "heads": [0, 2]},
        {"op": "reconstruct"}]}  # fmt: skip
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(doc))
    capsys.readouterr()
    code, _, err = call(capsys, "apply", plan, "--model", src, "--out", tmp_path / "out", "--stream")
    line = one_error_line(err)
    assert code == 2 and "cannot stream: steps[0] (prune_experts)" in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    code, _, err = call(capsys, "apply", plan, "--model", src, "--out", tmp_path / "out")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert manifest["apply"] == {"path": "in_memory"} and manifest["calibration"]["refits"]


def test_cli_apply_streams_a_reconstruct_plan(tmp_path, capsys):
    src = save_tiny(tmp_path / "src", "qwen3")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "calibration": calibration(src, calib_file(tmp_path)),
                                "steps": mixed_steps("qwen3")}))
    capsys.readouterr()
    code, out, err = call(capsys, "apply", plan, "--model", src, "--out", tmp_path / "out")
    assert code == 0, err
    assert "(stream, data steps layer by layer)" in out
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert manifest["apply"]["data_steps"] == "layer_by_layer" and manifest["calibration"]["refits"]


@pytest.mark.demo
def test_demo_data_plan_streams_byte_identical(tmp_path):
    """The real demo model (SmolLM2-135M, fp32 from its GGUF): heads and neurons cut in its first two layers, a
    whitened factor, reconstruct on 1,280 WikiText-2 tokens; streamed and in memory give the same sha256."""
    from surgery.errors import SourceError
    from surgery.sources import resolve_source

    try:
        resolved = resolve_source("smollm2-135m")
    except SourceError as e:
        pytest.skip(f"demo model unavailable: {e}")
    data = calib_file(tmp_path, WIKITEXT, chars=20_000)
    blocks = load_blocks(str(data), load_tokenizer(resolved), 256, 1280)
    cal = {"source": str(data), "fingerprint": blocks.fingerprint, "tokens": blocks.num_tokens, "seq_len": 256,
           "batch_size": 5}
    doc = {"version": 1, "calibration": cal, "steps": [
        {"op": "prune_heads", "layer": 0, "heads": [0, 4, 8]},
        {"op": "prune_neurons", "layer": 1, "neurons": list(range(0, 1536, 3))},
        {"op": "low_rank", "module": "model.layers.1.self_attn.q_proj", "rank": 128, "method": "whitened"},
        {"op": "reconstruct", "ridge": 1e-2},
    ]}  # fmt: skip
    both_paths(tmp_path, Path("smollm2-135m"), doc)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "stream").iterdir()}
    assert digests["model.safetensors"] == hashlib.sha256((tmp_path / "mem" / "model.safetensors").read_bytes()
                                                          ).hexdigest()
