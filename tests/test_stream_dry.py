"""The header-only (torch-free) plan of reads against the meta-device one, and the torch-free CLI paths.

Oracle: `surgery.stream.apply.build_stream_plan` builds the model on the meta device and cuts it (the path that is
itself held byte-identical to the in-memory apply by test_stream_apply); `surgery.stream.dry.header_stream_plan`
derives the same from config.json + the safetensors headers. Every output tensor's name, dtype, shape, source and
kept rows/columns, every shard (name, tensor order, exact size), the index and the parameter counts must agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_stream_apply import drop_attention_plan, rich_plan, uniform_plan
from tiny_models import FAMILIES, make_model, save_tiny, tiny_tokenizer

from surgery.loading import read_config
from surgery.plan import parse_plan
from surgery.resolve import resolve_plan
from surgery.shapes import shape_from_config
from surgery.stream.apply import build_stream_plan
from surgery.stream.dry import any_stream_plan, exact_params, header_stream_plan
from surgery.stream.layout import NotCovered, model_dtype

ROOT = Path(__file__).resolve().parents[1]


def plan_rows(splan) -> list:
    """Everything a StreamPlan decides, as plain data."""
    return [(s.name, s.nbytes, [(t.name, t.dtype, t.shape, t.source, t.rows, t.cols, t.factor) for t in s.tensors])
            for s in splan.shards]


def both(src: Path, plan: dict, dtype: str = "auto", max_shard_size: str = "5GB"):
    from surgery.loading import parse_dtype

    cfg = read_config(src)
    resolution = resolve_plan(parse_plan(plan), shape_from_config(cfg))
    meta = build_stream_plan(src, cfg, resolution, parse_dtype(dtype, cfg), max_shard_size)
    headers = header_stream_plan(src, cfg, resolution, dtype, max_shard_size)
    return meta, headers, cfg, resolution


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("make_plan", [rich_plan, uniform_plan, drop_attention_plan])
def test_header_plan_equals_meta_device_plan(tmp_path, family, make_plan):
    src = save_tiny(tmp_path / "src", family)
    dtype = "bfloat16" if make_plan is rich_plan else "auto"  # a dtype change too
    meta, headers, cfg, resolution = both(src, make_plan(family), dtype)
    assert headers.planned_by == "headers" and headers.model is None
    assert plan_rows(headers) == plan_rows(meta)
    assert headers.index == meta.index and headers.params_after == meta.params_after
    assert headers.bytes_read == meta.bytes_read and headers.bytes_written == meta.bytes_written
    describe = {k: v for k, v in headers.describe().items() if k not in ("planned_by", "notes")}
    assert describe == {k: v for k, v in meta.describe().items() if k not in ("planned_by", "notes")}

    from surgery.estimate import estimate
    from surgery.sources import resolve_source

    e = estimate(cfg, resolution)
    assert exact_params(resolve_source(str(src)), cfg, resolution) == (e.params_before, e.params_after)
    # the torch-free estimate from the headers: every count equal to the meta-device model's
    assert estimate(cfg, resolution, context=37, source_dir=src) == estimate(cfg, resolution, context=37)


def test_header_plan_sharded_bf16_input_and_output(tmp_path):
    src = tmp_path / "src"
    make_model("llama").to(torch.bfloat16).save_pretrained(src, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(src)
    for dtype in ("auto", "float16"):
        meta, headers, _, _ = both(src, rich_plan("llama"), dtype, max_shard_size="30KB")
        assert len(headers.shards) > 1 and headers.index is not None
        assert plan_rows(headers) == plan_rows(meta) and headers.index == meta.index


def test_surgery_checkpoint_falls_back_to_the_meta_device_and_says_so(tmp_path):
    from surgery.pipeline import apply_to_source

    src = save_tiny(tmp_path / "src", "qwen2")
    apply_to_source(parse_plan(rich_plan("qwen2")), tmp_path / "first", str(src), stream=True)
    first = tmp_path / "first"
    plan = {"version": 1, "steps": [{"op": "prune_kv_groups", "layer": 1, "groups": [0]}]}
    cfg = read_config(first)
    resolution = resolve_plan(parse_plan(plan), shape_from_config(cfg))
    with pytest.raises(NotCovered, match="surgery_layers"):
        header_stream_plan(first, cfg, resolution)
    splan = any_stream_plan(first, cfg, resolution)
    assert splan.planned_by == "meta-device model" and "does not cover" in splan.notes[0]


def test_unknown_tensor_in_the_checkpoint_is_not_covered(tmp_path):
    """A tensor the derivation does not know (the meta path would ignore it): fall back, never guess."""
    from safetensors.torch import load_file, save_file

    src = save_tiny(tmp_path / "src", "llama")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    cfg = read_config(src)
    resolution = resolve_plan(parse_plan(uniform_plan("llama")), shape_from_config(cfg))
    with pytest.raises(NotCovered, match="rotary_emb"):
        header_stream_plan(src, cfg, resolution)
    assert plan_rows(any_stream_plan(src, cfg, resolution)) == plan_rows(
        build_stream_plan(src, cfg, resolution, torch.float32))


@pytest.mark.parametrize("name", ["float32", "fp32", "f32", "float", "float16", "fp16", "f16", "half", "bfloat16",
                                  "bf16", "BF16", "torch.float16", "auto"])
def test_model_dtype_agrees_with_parse_dtype(name):
    from surgery.loading import parse_dtype
    from surgery.stream.writer import torch_dtype

    for cfg in ({}, {"dtype": "bfloat16"}, {"torch_dtype": "float16"}, {"dtype": "int8"}):
        assert torch_dtype(model_dtype(name, cfg)) == parse_dtype(name, cfg)


def _run_without_torch(tmp_path, *argv) -> tuple[dict, bool]:
    """Run the CLI in a fresh interpreter; returns (its --json output, whether torch got imported)."""
    code = ("import sys, atexit\n"
            "atexit.register(lambda: sys.stderr.write('TORCH-IMPORTED\\n' if 'torch' in sys.modules else ''))\n"
            "from workbench.cli import main\n"
            f"sys.argv = ['workbench', *{[str(a) for a in argv]!r}]\n"
            "main()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), "TORCH-IMPORTED" in p.stderr


def test_cli_dry_run_and_validate_do_not_import_torch(tmp_path):
    src = save_tiny(tmp_path / "src", "llama")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(rich_plan("llama")))
    report, torch_imported = _run_without_torch(tmp_path, "apply", plan, "--model", src, "--dry-run", "--json")
    assert report["path"] == "stream" and report["planned_by"] == "headers" and not torch_imported
    summary, torch_imported = _run_without_torch(tmp_path, "plan", "validate", plan, "--model", src, "--json")
    assert summary["valid"] and not torch_imported
    from surgery.estimate import estimate

    cfg = read_config(src)
    e = estimate(cfg, resolve_plan(parse_plan(rich_plan("llama")), shape_from_config(cfg)))
    assert (summary["params_before"], summary["params_after"]) == (e.params_before, e.params_after)
    assert report["params_after"] == e.params_after
