"""Streaming apply (surgery.stream) against the in-memory apply: byte-identical directories, every family and op.

The oracle is the in-memory path itself (load, cut, save_pretrained), which test_ops_oracle checks against masked
models: whatever streaming writes must be the same bytes (config.json, generation config, every safetensors shard,
the index, the tokenizer) and the same manifest apart from the `apply` block that says which path ran.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import call, one_error_line
from tiny_models import FAMILIES, make_config, make_model, save_tiny, tiny_tokenizer

from surgery.arch import spec_for_config
from surgery.plan import parse_plan
from surgery.pipeline import apply_to_source
from surgery.stream import plan_blockers


def _spec(family):
    return spec_for_config(make_config(family))


def rich_plan(family: str) -> dict:
    """Non-uniform: heads, neurons, low rank on a cut Linear and on an uncut one, drop_layers, drop_mlp."""
    spec = _spec(family)
    layer = lambda i: f"{spec.layers}.{i}"  # noqa: E731
    return {"version": 1, "steps": [
        {"op": "prune_heads", "layer": 0, "heads": [0, 2]},
        {"op": "low_rank", "module": f"{layer(0)}.{spec.attn}.{spec.attn_linears[0]}", "rank": 5},
        {"op": "prune_neurons", "layer": 1, "neurons": [1, 5, 6, 7, 50, 95]},
        {"op": "low_rank", "module": f"{layer(1)}.{spec.mlp}.{spec.down}", "rank": 7},
        {"op": "drop_mlp", "layer": 0},
        {"op": "drop_layers", "layers": [2]} if family != "gpt2" else {"op": "drop_attention", "layer": 2},
    ]}  # fmt: skip


def uniform_plan(family: str) -> dict:
    """Uniform in every layer (one KV group, the same neurons): plain values in config.json, no surgery_layers."""
    steps = []
    for i in range(3):
        steps.append({"op": "prune_kv_groups", "layer": i, "groups": [1]})
        steps.append({"op": "prune_neurons", "layer": i, "neurons": list(range(0, 96, 3))})
    return {"version": 1, "steps": steps}


def drop_attention_plan(family: str) -> dict:
    return {"version": 1, "steps": [{"op": "drop_attention", "layer": 1}, {"op": "prune_kv_groups", "layer": 0,
                                                                           "groups": [0]}]}


def assert_same_dirs(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "surgery.json":
            ma, mb = json.loads((a / name).read_text()), json.loads((b / name).read_text())
            assert ma.pop("apply")["path"] == "in_memory" and mb.pop("apply")["path"] == "stream"
            ma.pop("command"), mb.pop("command")
            assert ma == mb
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def save_pickled(path):
    """A tiny Llama whose only weights are a pickle (pytorch_model.bin)."""
    model = make_model("llama")
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def both_paths(tmp_path, src, plan: dict, **kw):
    plan = parse_plan(plan)
    mem = apply_to_source(plan, tmp_path / "mem", str(src), stream=False, **kw)
    streamed = apply_to_source(plan, tmp_path / "stream", str(src), stream=True, **kw)
    assert mem.manifest["apply"] == {"path": "in_memory"}
    assert streamed.manifest["apply"]["path"] == "stream"
    assert_same_dirs(tmp_path / "mem", tmp_path / "stream")
    return streamed


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("make_plan", [rich_plan, uniform_plan, drop_attention_plan])
def test_stream_is_byte_identical_to_in_memory(tmp_path, family, make_plan):
    src = save_tiny(tmp_path / "src", family)
    result = both_paths(tmp_path, src, make_plan(family))
    if make_plan is uniform_plan and family != "gpt2":  # GPT-2 derives head_dim from hidden / heads
        assert result.manifest["output"]["loadable_with"] == "transformers"


def test_stream_bf16_sharded_input_and_output_and_dtype_change(tmp_path):
    """bf16 weights in 3 input shards, written as float16 in several output shards, with a low-rank factor."""
    from surgery.apply import apply_resolution, validate_plan
    from surgery.export import save_model_dir
    from surgery.loading import load_model, read_config
    from surgery.stream import build_stream_plan, save_streamed_dir

    src = tmp_path / "src"
    make_model("llama").to(torch.bfloat16).save_pretrained(src, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file()
    plan = parse_plan(rich_plan("llama"))
    both_paths(tmp_path / "auto", src, plan.model_dump(), dtype="auto")
    both_paths(tmp_path / "fp16", src, plan.model_dump(), dtype="float16")

    loaded = load_model(src, dtype="bfloat16")
    resolution = validate_plan(plan, loaded.model)
    apply_resolution(loaded.model, resolution)
    save_model_dir(loaded.model, tmp_path / "mem", tokenizer=loaded.tokenizer, max_shard_size="30KB")
    splan = build_stream_plan(src, read_config(src), resolution, torch.bfloat16, max_shard_size="30KB")
    save_streamed_dir(splan, tmp_path / "stream", tokenizer=loaded.tokenizer)
    assert len(splan.shards) > 1 and (tmp_path / "stream" / "model.safetensors.index.json").is_file()
    assert_same_dirs(tmp_path / "mem", tmp_path / "stream")


def test_stream_from_a_surgery_checkpoint(tmp_path):
    """Input with per-layer shapes and low-rank modules (`surgery_layers`), cut again."""
    src = save_tiny(tmp_path / "src", "qwen2")
    apply_to_source(parse_plan(rich_plan("qwen2")), tmp_path / "first", str(src), stream=True)
    assert json.loads((tmp_path / "first" / "config.json").read_text()).get("surgery_layers")
    # the first output's layer 1 (original layer 1) keeps its heads: cut one KV group there, drop layer 0
    plan = {"version": 1, "steps": [{"op": "prune_kv_groups", "layer": 1, "groups": [0]},
                                    {"op": "drop_layers", "layers": [0]}]}
    both_paths(tmp_path / "again", tmp_path / "first", plan)


def test_streamed_output_loads_and_matches_logits(tmp_path):
    """Not only the same bytes as in-memory: the streamed checkpoint runs, with the in-memory model's logits."""
    from surgery.apply import apply_plan
    from surgery.loading import load_model
    from tiny_models import tokens

    src = save_tiny(tmp_path / "src", "llama")
    plan = parse_plan(rich_plan("llama"))
    apply_to_source(plan, tmp_path / "out", str(src), stream=True)
    model = make_model("llama")
    apply_plan(model, plan)
    loaded = load_model(tmp_path / "out").model
    with torch.no_grad():
        # tolerance: the reference runs eager attention, the loaded model SDPA
        torch.testing.assert_close(loaded(tokens()).logits, model(tokens()).logits, rtol=1e-4, atol=1e-4)


def test_default_streams_when_possible_and_falls_back(tmp_path):
    src = save_tiny(tmp_path / "src", "llama")
    auto = apply_to_source(parse_plan(uniform_plan("llama")), tmp_path / "auto", str(src))
    assert auto.manifest["apply"]["path"] == "stream"
    pickled = save_pickled(tmp_path / "pickled")
    fallback = apply_to_source(parse_plan(uniform_plan("llama")), tmp_path / "fb", str(pickled), allow_pickle=True)
    assert fallback.manifest["apply"]["path"] == "in_memory"


def test_plan_blockers_name_the_step():
    from types import SimpleNamespace

    plan = parse_plan({"version": 1, "steps": [{"op": "drop_layers", "layers": [1]}]})
    assert plan_blockers(plan) == []
    lines = plan_blockers(plan, pickle_weights=True)
    assert len(lines) == 1 and "pickles" in lines[0]
    # data steps stream (fitted layer by layer: tests/test_stream_datasteps.py); experts, hidden channels and an
    # op the streaming applier does not know do not, each named by its step (plain objects: no schema needed)
    steps = [SimpleNamespace(op="drop_mlp"), SimpleNamespace(op="reconstruct"),
             SimpleNamespace(op="low_rank", method="whitened"), SimpleNamespace(op="low_rank", method="asvd"),
             SimpleNamespace(op="prune_experts"), SimpleNamespace(op="prune_hidden"), SimpleNamespace(op="new_op")]
    lines = plan_blockers(SimpleNamespace(steps=steps))
    assert [line.split(":")[0] for line in lines] == ["steps[4] (prune_experts)", "steps[5] (prune_hidden)",
                                                      "steps[6] (new_op)"]


def test_cli_stream_forced_on_pickles_is_one_line_exit_2(tmp_path, capsys):
    pickled = save_pickled(tmp_path / "pickled")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(uniform_plan("llama")))
    capsys.readouterr()
    code, _, err = call(capsys, "apply", plan, "--model", pickled, "--out", tmp_path / "out", "--allow-pickle",
                        "--stream")
    assert code == 2
    assert "cannot stream" in one_error_line(err) and "pickles" in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_when_the_disk_is_too_small(tmp_path, capsys, monkeypatch):
    import surgery.stream.apply as stream_apply

    src = save_tiny(tmp_path / "src", "llama")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(uniform_plan("llama")))
    real = shutil.disk_usage
    monkeypatch.setattr(stream_apply.shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    capsys.readouterr()  # save_tiny's progress bars
    code, _, err = call(capsys, "apply", plan, "--model", src, "--out", tmp_path / "out")
    assert code == 2
    assert "not enough disk space" in one_error_line(err)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_cli_dry_run_reads_no_weights(tmp_path, capsys):
    src = save_tiny(tmp_path / "src", "llama")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(rich_plan("llama")))
    # the weights are zeroed past their headers: a dry run must not notice
    weights = src / "model.safetensors"
    n = int.from_bytes(weights.read_bytes()[:8], "little")
    with weights.open("r+b") as f:
        f.seek(8 + n)
        f.write(bytes(weights.stat().st_size - 8 - n))
    code, out, _ = call(capsys, "apply", plan, "--model", src, "--dry-run", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["path"] == "stream"
    apply_to_source(parse_plan(rich_plan("llama")), tmp_path / "out", str(src), stream=True)
    assert report["bytes_written"] == (tmp_path / "out" / "model.safetensors").stat().st_size
    down = next(r for r in report["reads"] if r["name"] == "model.layers.1.mlp.gate_proj.weight")
    assert down["rows"] == [90, 96] and down["cols"] is None


def test_tokenizer_round_trip_is_cached_by_content(tmp_path, monkeypatch):
    """The streamed output's tokenizer files are save_pretrained's output (byte-identical to the in-memory path),
    computed once per distinct tokenizer: a later apply copies them without loading a tokenizer, and a changed
    tokenizer file is a new round trip, never the stale one."""
    import surgery.loading

    src = save_tiny(tmp_path / "src", "llama")
    both_paths(tmp_path / "first", src, uniform_plan("llama"))

    def no_load(*a, **k):
        raise AssertionError("the tokenizer was loaded again")

    with monkeypatch.context() as m:
        m.setattr(surgery.loading, "load_tokenizer", no_load)
        apply_to_source(parse_plan(uniform_plan("llama")), tmp_path / "again", str(src), stream=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "first" / "mem" / name).read_bytes()
    # another tokenizer in the same directory: a cache miss, and again what save_pretrained writes
    tiny_tokenizer(shuffle_seed=3).save_pretrained(src)
    both_paths(tmp_path / "changed", src, uniform_plan("llama"))
    assert (tmp_path / "changed" / "stream" / "tokenizer.json").read_bytes() != \
        (tmp_path / "again" / "tokenizer.json").read_bytes()


def test_free_space_check_uses_the_exact_output_size(tmp_path, monkeypatch):
    """The refusal threshold is the exact bytes: shards + copied tokenizer files + the margin for small JSON."""
    import surgery.stream.apply as stream_apply
    from surgery.errors import UserError
    from surgery.loading import parse_dtype, read_config
    from surgery.resolve import resolve_plan
    from surgery.shapes import shape_from_config
    from surgery.stream.tokenizer import cached_tokenizer_files

    src = save_tiny(tmp_path / "src", "llama")
    cfg = read_config(src)
    resolution = resolve_plan(parse_plan(uniform_plan("llama")), shape_from_config(cfg))
    splan = stream_apply.build_stream_plan(src, cfg, resolution, parse_dtype("auto", cfg))
    copied = cached_tokenizer_files(src)
    needed = splan.bytes_written + sum(p.stat().st_size for p in copied) + stream_apply._SMALL_FILES_MARGIN
    real = shutil.disk_usage
    for free, refused in ((needed - 1, True), (needed, False)):
        monkeypatch.setattr(stream_apply.shutil, "disk_usage", lambda p, f=free: real(p)._replace(free=f))
        if refused:
            with pytest.raises(UserError, match="not enough disk space"):
                stream_apply.check_free_space(tmp_path / "out" / "deeper", splan, copied)
        else:
            stream_apply.check_free_space(tmp_path / "out" / "deeper", splan, copied)
    # what was written: the shards are exactly the planned bytes
    apply_to_source(parse_plan(uniform_plan("llama")), tmp_path / "written", str(src), stream=True)
    assert (tmp_path / "written" / "model.safetensors").stat().st_size == splan.bytes_written


def _select(rng, n: int, keep: float, block: int = 1):
    """Sorted kept indices of 0..n: random whole blocks of `block` (runs and gaps of many lengths)."""
    blocks = sorted(rng.sample(range(n // block), max(1, round(n // block * keep))))
    return [b * block + i for b in blocks for i in range(block)]


def test_a_whole_tensor_read_leaves_the_pieces_handed_out_intact(tmp_path, monkeypatch):
    """A low-rank weight read whole (SliceReader.tensor) between two pieces of the stream must not refill the
    buffers of pieces still waiting in the hash queue: it did, and the threaded hash gave a wrong fingerprint."""
    from array import array

    from safetensors.torch import save_file

    import surgery.stream.writer as writer
    from surgery.stream.reads import TensorRead
    from surgery.stream.source import tensor_locations

    monkeypatch.setattr(writer, "CHUNK", 256)
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(40, 16, generator=g), "w": torch.randn(64, 32, generator=g)}
    (tmp_path / "src").mkdir()
    save_file(tensors, tmp_path / "src" / "model.safetensors")
    reader = writer.SliceReader(tensor_locations(tmp_path / "src"))
    try:
        held = list(reader.chunks(TensorRead("a", "F32", (40, 16), "a", None, None)))[-(writer._BUFFERS - 1):]
        copies = [bytes(p) for p in held]  # the pieces the hash queue may still hold
        w = reader.tensor(TensorRead("w", "F32", (64, 16), "w", None, array("q", range(0, 32, 2))))
        assert torch.equal(w, tensors["w"][:, ::2])
        assert [bytes(p) for p in held] == copies
    finally:
        reader.close()


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, "BF16"), (torch.float32, "F32"),
                                             (torch.bfloat16, "F16"), (torch.float16, "F32")])
def test_slice_reader_cuts_like_numpy_indexing(tmp_path, monkeypatch, dtype, out_dtype):
    """Every read path (row byte ranges with read-through gaps split across buffers and preadv calls, column blocks
    and single columns gathered by numpy, rows and columns together, dtype changes) against plain indexing of the
    whole tensor, with the buffer, gap and iovec limits shrunk so that each split really happens."""
    import random
    from array import array

    from safetensors.torch import save_file

    import surgery.stream.reads as reads
    import surgery.stream.writer as writer
    from surgery.stream.reads import TensorRead
    from surgery.stream.source import tensor_locations

    monkeypatch.setattr(writer, "CHUNK", 640)
    monkeypatch.setattr(writer, "_IOV_MAX", 3)
    for module in (reads, writer):
        monkeypatch.setattr(module, "GAP_BYTES", 96)
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(37, 48, generator=g).to(dtype), "conv": torch.randn(29, 12, 3, generator=g).to(dtype),
               "bias": torch.randn(301, generator=g).to(dtype), "big_row": torch.randn(3, 400, generator=g).to(dtype)}
    (tmp_path / "src").mkdir()
    save_file(tensors, tmp_path / "src" / "model.safetensors")
    sources = tensor_locations(tmp_path / "src")
    reader = writer.SliceReader(sources)
    rng = random.Random(1)
    out_torch = writer.torch_dtype(out_dtype)
    cases = []
    for name, t in tensors.items():
        for keep in (1.0, 0.8, 0.3):
            rows = _select(rng, t.shape[0], keep)
            cases.append((name, rows, None))
            if t.dim() > 1:
                for block in (1, 4, 12):
                    cols = _select(rng, t.shape[1], keep, block) if t.shape[1] % block == 0 else None
                    cases += [(name, None, cols), (name, rows, cols)]
    try:
        for name, rows, cols in cases:
            t = tensors[name]
            want = t if rows is None else t[rows]
            want = want if cols is None else want[:, cols]
            read = TensorRead(name, out_dtype, tuple(want.shape), name, None if rows is None else array("q", rows),
                              None if cols is None else array("q", cols))
            got = b"".join(bytes(piece) for piece in reader.chunks(read))
            assert got == want.to(out_torch).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), \
                (name, rows, cols)
            assert torch.equal(reader.tensor(read), want.to(out_torch))
    finally:
        reader.close()


def test_stream_identical_when_writeback_hints_fail_or_are_missing(tmp_path, monkeypatch):
    """sync_file_range is only a hint: where it fails (first call) it is not tried again, and where the C library
    lacks it the stream does without; the output is the same bytes either way."""
    import surgery.stream.writer as writer

    monkeypatch.setattr(writer, "_WRITEBACK_BYTES", 1024)
    calls = []
    src = save_tiny(tmp_path / "src", "llama")
    for name, starter in (("failing", lambda fd, offset, n: calls.append(n) or -1), ("missing", None)):
        monkeypatch.setattr(writer, "_START_WRITEBACK", starter)
        both_paths(tmp_path / name, src, uniform_plan("llama"))
    assert len(calls) == 1  # one shard: tried once, then left off


@pytest.mark.parametrize("threaded", [True, False])
def test_stream_hash_threaded_or_inline_is_the_fingerprint(tmp_path, monkeypatch, threaded):
    """The output fingerprint is weights_fingerprint of the directory (both_paths compares the manifests) whether
    the hash runs in its thread or inline, with buffers small enough that the rotation wraps many times."""
    import surgery.stream.writer as writer

    monkeypatch.setattr(writer, "hash_thread_pays", lambda: threaded)
    monkeypatch.setattr(writer, "CHUNK", 512)
    src = save_tiny(tmp_path / "src", "llama")
    both_paths(tmp_path, src, rich_plan("llama"))


def test_input_truncated_after_planning_is_one_source_error(tmp_path):
    """A shard cut short between planning and writing: a SourceError naming the file (one line, exit 2 from the
    CLI), not a short output."""
    from surgery.errors import SourceError
    from surgery.loading import parse_dtype, read_config
    from surgery.resolve import resolve_plan
    from surgery.shapes import shape_from_config
    from surgery.stream.apply import build_stream_plan, write_stream

    src = save_tiny(tmp_path / "src", "llama")
    cfg = read_config(src)
    resolution = resolve_plan(parse_plan(uniform_plan("llama")), shape_from_config(cfg))
    splan = build_stream_plan(src, cfg, resolution, parse_dtype("auto", cfg))
    shard = src / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    (tmp_path / "out").mkdir()
    with pytest.raises(SourceError, match="model.safetensors: unexpected end of file"):
        write_stream(splan, tmp_path / "out")
