"""GGUF export judged by llama.cpp itself (llama-cpp-python): the exported file must give surgery.load's logits on
the same token ids (f32: max abs diff <= 1e-3, every position) and the same 32-token greedy continuation.

Covers uniform (`llama` / `qwen2` / `qwen3`) and non-uniform (`deci`) cuts: per-layer heads, KV groups and neurons,
dropped layers, dropped attention (the first layer included), dropped MLP (the last layer included), low-rank
factors; other dtypes; bad input. Test models are built once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import surgery
from cli_helpers import call, one_error_line
from llama_cpp_helpers import open_llama
from surgery.apply import apply_plan
from surgery.errors import SourceError
from surgery.export import save_model_dir
from surgery.export.gguf import export_gguf, write_gguf
from surgery.plan import parse_plan
from tiny_models import make_model, save_tiny, tiny_tokenizer, tokens

F32_ATOL = 1e-3
GREEDY = 32
PROMPT = tokens(batch=1, length=16, seed=7)[0].tolist()

PLANS = {
    "uniform": [s for i in range(3) for s in ({"op": "prune_heads", "layer": i, "heads": [0, 2]},
                                              {"op": "prune_neurons", "layer": i, "neurons": list(range(16))})],
    "nonuniform": [{"op": "prune_heads", "layer": 0, "heads": [0, 2]},
                   {"op": "prune_neurons", "layer": 0, "neurons": list(range(16))},
                   {"op": "prune_kv_groups", "layer": 1, "groups": [1]},
                   {"op": "prune_neurons", "layer": 1, "neurons": list(range(10, 50))}],
    "dropped_layers": [{"op": "drop_layers", "layers": [1]}],
    # the first layer without attention, and a middle layer with nothing left (the identity)
    "dropped_attention": [{"op": "drop_attention", "layer": 0}, {"op": "drop_attention", "layer": 1},
                          {"op": "drop_mlp", "layer": 1}],
    "dropped_mlp": [{"op": "drop_mlp", "layer": 1}, {"op": "drop_mlp", "layer": 2}],
    "low_rank": [{"op": "low_rank", "module": "model.layers.0.self_attn.q_proj", "rank": 6},
                 {"op": "low_rank", "module": "model.layers.1.mlp.down_proj", "rank": 8}],
}
ARCH = {"uniform": "llama", "nonuniform": "deci", "dropped_layers": "llama", "dropped_attention": "deci",
        "dropped_mlp": "deci", "low_rank": "llama"}


def _run_llama(path, ids, generate: int = 0):
    """(all-position logits, greedy continuation) from llama.cpp."""
    llm = open_llama(path)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    continuation = []
    if generate:
        for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            continuation.append(tok)
            if len(continuation) == generate:
                break
    llm.close()
    return logits, continuation


def _run_torch(model, ids, generate: int = 0):
    """(all-position logits, greedy continuation) from the torch model. Each step recomputes the whole sequence:
    decoding with transformers' KV cache goes wrong when layer 0's attention is dropped (reported; llama.cpp
    agrees with the full recomputation)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
        seq = list(ids)
        for _ in range(generate):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return logits, seq[len(ids):]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{variant: (apply-output dir, f32 .gguf, report)} for every plan in PLANS, on the tiny Llama."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, steps in PLANS.items():
        pruned, _ = apply_plan(make_model("llama"), parse_plan({"version": 1, "steps": steps}))
        directory = save_model_dir(pruned, root / name, tokenizer=tiny_tokenizer())
        report = export_gguf(str(directory), root / f"{name}.gguf", dtype="f32")
        out[name] = (directory, root / f"{name}.gguf", report)
    return out


@pytest.mark.parametrize("variant", list(PLANS))
def test_llama_cpp_matches_surgery_load_at_f32(exported, variant):
    directory, path, report = exported[variant]
    assert report.architecture == ARCH[variant]
    want, want_next = _run_torch(surgery.load(str(directory), dtype="float32"), PROMPT, GREEDY)
    got, got_next = _run_llama(path, PROMPT, GREEDY)
    assert np.abs(want).max() > 1.0  # logits that are not near-constant: a wrong layer would show
    assert np.abs(got[-1] - want[-1]).max() <= F32_ATOL
    assert np.abs(got - want).max() <= F32_ATOL
    assert got_next == want_next


def test_what_the_format_forced_is_reported(exported):
    dropped = exported["dropped_attention"][2]
    texts = " | ".join(a.what for a in dropped.adjustments)
    assert "layer 1: no attention and no MLP" in texts and "first layer has no attention" in texts
    assert dropped.params_added == 4 * 16 * 64 + 64  # one zero head (q, k, v, o) and its norm
    mlp = exported["dropped_mlp"][2]
    assert sum("zero MLP of width 1" in a.what for a in mlp.adjustments) == 2
    low = exported["low_rank"][2]
    densified = [a for a in low.adjustments if "densified" in a.what]
    assert [a.params_added for a in densified] == [64 * 64 - 6 * 128, 64 * 96 - 8 * 160]
    uniform = exported["uniform"][2].adjustments  # MLP width 80 in every layer: zero neurons up to 96
    assert len(uniform) == 1 and "padded to multiples of 32" in uniform[0].what
    assert uniform[0].params_added == 3 * (3 * 64 * 16)


QWEN_STEPS = {  # llama.cpp's qwen2 needs every query head (heads x head size = hidden); qwen3 does not
    "qwen2": [{"op": "drop_layers", "layers": [1]}] + [{"op": "prune_neurons", "layer": i, "neurons": list(range(32))}
                                                       for i in (0, 2)],
    "qwen3": [s for i in range(3) for s in ({"op": "prune_kv_groups", "layer": i, "groups": [0]},
                                            {"op": "prune_neurons", "layer": i, "neurons": list(range(32))})],
}


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_uniform_qwen_exports_to_its_own_architecture(tmp_path, family):
    steps = QWEN_STEPS[family]
    pruned, _ = apply_plan(make_model(family), parse_plan({"version": 1, "steps": steps}))
    report = write_gguf(pruned, tiny_tokenizer(), tmp_path / "q.gguf", dtype="f32")
    assert report.architecture == family
    want, want_next = _run_torch(pruned, PROMPT, GREEDY)
    got, got_next = _run_llama(tmp_path / "q.gguf", PROMPT, GREEDY)
    assert np.abs(got - want).max() <= F32_ATOL
    assert got_next == want_next


def _random_biases(model, seed: int = 3):
    """Every bias of `model` drawn from N(0, 1) (transformers initialises them to zero, which would hide a bias
    written to the wrong rows or not at all)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


BIAS_CASES = {  # (family, plan, llama.cpp architecture, GGUF bias tensors per layer in the file)
    # every layer: 2 of 4 heads, 80 of 96 neurons (zero-padded to 96 with zero biases)
    "llama_uniform": ("llama", PLANS["uniform"], "llama", 7),
    # per-layer heads / KV groups / neurons (bias rows pruned with them), a biased q_proj at rank 6, an
    # attention-free first layer (its zero head carries no bias)
    "llama_nonuniform": ("llama", PLANS["nonuniform"] + [
        {"op": "low_rank", "module": "model.layers.2.self_attn.q_proj", "rank": 6},
        {"op": "drop_attention", "layer": 0}], "deci", None),
    "qwen2_uniform": ("qwen2", QWEN_STEPS["qwen2"], "qwen2", 3),  # q/k/v biases only (Qwen2 has no o_proj bias)
}


@pytest.mark.parametrize("case", list(BIAS_CASES))
def test_biases_are_written_where_llama_cpp_reads_them(tmp_path, case):
    import gguf

    family, steps, arch, per_layer = BIAS_CASES[case]
    model = make_model(family, attention_bias=True, mlp_bias=True) if family == "llama" else make_model(family)
    pruned, _ = apply_plan(_random_biases(model), parse_plan({"version": 1, "steps": steps}))
    directory = save_model_dir(pruned, tmp_path / "src", tokenizer=tiny_tokenizer())
    report = export_gguf(str(directory), tmp_path / "b.gguf", dtype="f32")
    assert report.architecture == arch
    names = [t.name for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors]
    biases = [n for n in names if n.endswith(".bias")]
    if per_layer:
        assert len(biases) == per_layer * sum(n.endswith("attn_norm.weight") for n in names)
    else:  # layer 0: no attention (MLP biases only); layers 1, 2: all seven
        assert sorted(n for n in biases if n.startswith("blk.0.")) == [f"blk.0.ffn_{p}.bias" for p in
                                                                         ("down", "gate", "up")]
        assert len(biases) == 3 + 7 + 7
    want, want_next = _run_torch(surgery.load(str(directory), dtype="float32"), PROMPT, GREEDY)
    got, got_next = _run_llama(tmp_path / "b.gguf", PROMPT, GREEDY)
    assert np.abs(got - want).max() <= F32_ATOL
    assert got_next == want_next


def test_biases_llama_cpp_would_not_read_are_refused(tmp_path, capsys):
    """Qwen3 with attention_bias has an o_proj bias; llama.cpp's qwen3 reads q/k/v biases only."""
    from transformers import AutoModelForCausalLM

    from tiny_models import make_config

    config = make_config("qwen3")
    config.attention_bias = True
    torch.manual_seed(0)
    model = _random_biases(AutoModelForCausalLM.from_config(config).eval())
    directory = save_model_dir(model, tmp_path / "src", tokenizer=tiny_tokenizer())
    code, _, err = call(capsys, "export", directory, "--to", "gguf", "--out", tmp_path / "q.gguf")
    assert code == 2
    assert "o_proj (attn_output.bias)" in one_error_line(err)
    assert not (tmp_path / "q.gguf").exists()


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_lower_precision_exports_stay_close(exported, tmp_path, dtype):
    directory = exported["nonuniform"][0]
    report = export_gguf(str(directory), tmp_path / "m.gguf", dtype=dtype)
    assert report.dtype == dtype and report.file_bytes < exported["nonuniform"][2].file_bytes
    want, _ = _run_torch(surgery.load(str(directory), dtype="float32"), PROMPT)
    got, _ = _run_llama(tmp_path / "m.gguf", PROMPT)
    scale = np.abs(want).max()
    # measured (max diff / max |logit|): f16 0.007, bf16 0.037, q8_0 0.155 (q8_0 also quantises the activations;
    # the tiny model's large random weights make that coarse); a wrong tensor layout is off by ~100%
    assert np.abs(got - want).max() <= {"f16": 0.02, "bf16": 0.1, "q8_0": 0.3}[dtype] * scale
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85


def test_q8_0_falls_back_per_tensor_and_says_so(exported, tmp_path):
    report = export_gguf(str(exported["dropped_mlp"][0]), tmp_path / "m.gguf", dtype="q8_0")
    fallback = [a.what for a in report.adjustments if a.what.startswith("q8_0:")]
    assert fallback and "2 tensor(s)" in fallback[0]  # the two width-1 zero down projections
    got, _ = _run_llama(tmp_path / "m.gguf", PROMPT)
    assert np.isfinite(got).all()


def test_cli_export_writes_a_file_llama_cpp_runs(exported, tmp_path, capsys):
    out = tmp_path / "pruned.gguf"
    code, stdout, _ = call(capsys, "export", exported["nonuniform"][0], "--to", "gguf", "--out", out,
                           "--dtype", "f32", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["architecture"] == "deci" and report["file_bytes"] == out.stat().st_size
    got, _ = _run_llama(out, PROMPT)
    np.testing.assert_allclose(got, _run_llama(exported["nonuniform"][1], PROMPT)[0], atol=0, rtol=0)


def _bad_inputs(tmp_path, exported):
    src = str(exported["uniform"][0])
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")
    return {
        "not a model": ([junk, "--to", "gguf", "--out", tmp_path / "o.gguf"], tmp_path / "o.gguf"),
        "unknown target": ([src, "--to", "onnx", "--out", tmp_path / "o.gguf"], tmp_path / "o.gguf"),
        "bad dtype": ([src, "--to", "gguf", "--out", tmp_path / "o.gguf", "--dtype", "q4_k"], tmp_path / "o.gguf"),
        "unwritable out": ([src, "--to", "gguf", "--out", a_file / "o.gguf"], a_file / "o.gguf"),
        "out is a directory": ([src, "--to", "gguf", "--out", junk], junk / "o.gguf"),
        "unsupported family": ([gpt2, "--to", "gguf", "--out", tmp_path / "o.gguf"], tmp_path / "o.gguf"),
    }


def test_bad_input_is_one_line_exit_2_and_writes_nothing(exported, tmp_path, capsys):
    cases = _bad_inputs(tmp_path, exported)
    capsys.readouterr()  # building the models printed progress bars
    for label, (argv, never) in cases.items():
        code, _, err = call(capsys, "export", *argv)
        assert code == 2, label
        if label != "unknown target":  # typer's own usage error for an enum choice
            line = one_error_line(err)
            if label == "unsupported family":
                assert "llama" in line and "qwen2" in line
        assert not never.exists(), label
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_existing_output_is_kept_without_overwrite(exported, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    code, _, err = call(capsys, "export", exported["uniform"][0], "--to", "gguf", "--out", out)
    assert code == 2 and "--overwrite" in one_error_line(err)
    assert out.read_bytes() == b"keep me"
    assert call(capsys, "export", exported["uniform"][0], "--to", "gguf", "--out", out, "--overwrite")[0] == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize(("steps", "message"), [
    ([{"op": "drop_mlp", "layer": 1}], "Llama-family"),
    ([{"op": "prune_kv_groups", "layer": i, "groups": [0]} for i in range(3)], "keep every query head"),
])
def test_qwen2_shapes_llama_cpp_cannot_run_are_refused(tmp_path, steps, message):
    pruned, _ = apply_plan(make_model("qwen2"), parse_plan({"version": 1, "steps": steps}))
    with pytest.raises(surgery.errors.UserError, match=message):
        write_gguf(pruned, tiny_tokenizer(), tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()


@pytest.mark.demo
def test_demo_nonuniform_plan_runs_in_llama_cpp(tmp_path):
    from pathlib import Path

    from surgery.loading import load_model
    from surgery.plan import load_plan

    try:
        demo = load_model("smollm2-135m")
    except SourceError as e:
        pytest.skip(f"demo model unavailable: {e}")
    plan = load_plan(Path(__file__).parents[1] / "docs" / "examples" / "smollm2-demo-plan.json")
    pruned, _ = apply_plan(demo.model, plan)
    report = write_gguf(pruned, demo.tokenizer, tmp_path / "demo.gguf", dtype="f32")
    assert report.architecture == "deci"
    ids = demo.tokenizer("The capital of France is Paris. The Eiffel Tower was built for")["input_ids"]
    want, want_next = _run_torch(pruned, ids, GREEDY)
    got, got_next = _run_llama(tmp_path / "demo.gguf", ids, GREEDY)
    assert np.abs(got - want).max() <= 0.05  # measured 0.02 on the unpruned demo (logits up to ~30)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert got_next == want_next
    llm = open_llama(tmp_path / "demo.gguf", logits_all=False, vocab_only=True)
    text = "Tokenizer check: 12345 words, UPPER and lower."
    assert llm.tokenize(text.encode(), add_bos=False) == demo.tokenizer(text)["input_ids"]


WIKITEXT = Path(__file__).parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
SENTENCES = ["Hello world", "The Eiffel Tower, completed in 1889, is 330 m tall.", "digits 12345 and 3.14159",
             "naïve café — ünïcode 日本語 🙂", "two  spaces\nnewline\ttab", " a leading space", "  two leading spaces"]
LLAMA2_NORMALIZER = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                         {"type": "Replace", "pattern": {"String": " "},
                                                          "content": "\u2581"}]}


@pytest.fixture(scope="module")
def sentencepiece_dirs(tmp_path_factory):
    """{style: tokenizer directory} from one SentencePiece BPE model (byte fallback, digits split) trained on
    WikiText-2 here: "transformers" as transformers 5 converts a tokenizer.model (Metaspace pre-tokenizer), and
    "llama2" as Llama 2 / Mistral / TinyLlama ship tokenizer.json (Prepend + Replace normalizer)."""
    import io

    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    if not (WIKITEXT.is_file() and SHAKESPEARE.is_file()):
        pytest.skip(f"no WikiText-2 / tiny-shakespeare under {WIKITEXT.parents[1]}")
    lines = [line for line in WIKITEXT.read_text(encoding="utf-8")[:300_000].splitlines() if line.strip()]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, vocab_size=1000,
                                   model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    root = tmp_path_factory.mktemp("spm")
    (root / "spm").mkdir()
    (root / "spm" / "tokenizer.model").write_bytes(proto.getvalue())
    (root / "spm" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                                         "add_eos_token": False}))
    converted = AutoTokenizer.from_pretrained(root / "spm")
    converted.save_pretrained(root / "transformers")
    converted.save_pretrained(root / "llama2")
    spec = json.loads((root / "llama2" / "tokenizer.json").read_text(encoding="utf-8"))
    spec.update(normalizer=LLAMA2_NORMALIZER, pre_tokenizer=None)
    (root / "llama2" / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = json.loads((root / "llama2" / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the tokenizer.json as it is, as tokenizers reads it
    (root / "llama2" / "tokenizer_config.json").write_text(json.dumps(config))
    return {style: root / style for style in ("transformers", "llama2")}


@pytest.mark.parametrize("style", ["transformers", "llama2"])
def test_sentencepiece_tokenizer_round_trips_through_llama_cpp(sentencepiece_dirs, tmp_path, style):
    import gguf
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(sentencepiece_dirs[style])
    directory = save_model_dir(make_model("llama", vocab_size=len(hf)), tmp_path / "src", tokenizer=hf)
    report = export_gguf(str(directory), tmp_path / "s.gguf", dtype="f32")
    fields = gguf.GGUFReader(tmp_path / "s.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [2, 3, 3] and types[3:259] == [6] * 256  # <unk>, <s>, </s>, the 256 byte pieces
    llm = open_llama(tmp_path / "s.gguf", logits_all=False, vocab_only=True)
    # transformers' Metaspace does not prepend a second "▁" to text starting with a space; llama.cpp (like
    # sentencepiece) does: the export says so, and those texts are the only ones that differ
    metaspace = style == "transformers"
    assert metaspace == any("Metaspace" in a.what for a in report.adjustments)
    checked = 0
    for text in SENTENCES:
        if metaspace and text.startswith(" "):
            continue
        ids = hf(text)["input_ids"]
        assert ids[0] == hf.bos_token_id and 0 not in ids  # BOS added; no <unk>: unicode went to byte pieces
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text
        assert llm.detokenize(ids).decode() == hf.decode(ids, skip_special_tokens=True), text
        checked += 1
    assert checked == len(SENTENCES) - 2 * metaspace
    # a long passage from another corpus: with every score equal (no merge order) llama.cpp splits 45 of its 86
    # lines differently (measured), so this is what checks the scores
    passage = SHAKESPEARE.read_text(encoding="utf-8")[:3000]
    ids = hf(passage)["input_ids"]
    assert llm.tokenize(passage.encode(), add_bos=True, special=False) == ids
    assert llm.detokenize(ids).decode() == hf.decode(ids, skip_special_tokens=True)
    llm.close()


def test_unknown_tokenizer_kinds_are_refused(tmp_path, capsys):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0)] + [(c, -float(i + 1)) for i, c in enumerate("abcdefgh \u2581")]
    unigram = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False)),
                                      unk_token="<unk>")
    directory = save_model_dir(make_model("llama"), tmp_path / "src", tokenizer=unigram)
    code, _, err = call(capsys, "export", directory, "--to", "gguf", "--out", tmp_path / "u.gguf")
    assert code == 2 and "Unigram" in one_error_line(err)
    assert not (tmp_path / "u.gguf").exists()
