"""`workbench eval` and `workbench compare` end to end: numbers against plain transformers, records reused, one
table in three formats, and bad input -> one line on stderr and exit code 2."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgery.data import load_blocks
from surgery.pipeline import apply_to_source
from surgery.plan import parse_plan
from cli_helpers import call, one_error_line
from test_metrics import DATA, plain_block_ppl, text_file
from tiny_models import save_tiny, tiny_tokenizer

WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    base = save_tiny(root / "base")
    plan = parse_plan({"version": 1, "steps": [
        {"op": "prune_heads", "layer": 0, "heads": [1, 3]},
        {"op": "prune_neurons", "layer": 1, "neurons": list(range(0, 96, 3))},
    ]})
    apply_to_source(plan, root / "pruned", str(base))
    return {
        "base": base,
        "pruned": root / "pruned",
        "shuffled": save_tiny(root / "shuffled", shuffle_seed=3),  # same weights, other token ids
        "vocab100": save_tiny(root / "vocab100", vocab=100),
        "text": text_file(root),
    }


NO_SPEED = ("--seq-len", 32, "--no-speed")


def test_eval_json_matches_plain_transformers_and_reuses_records(capsys, models, tmp_path):
    records = tmp_path / "records"
    argv = ("eval", models["base"], "--data", models["text"], *NO_SPEED, "--tokens", 160, "--records", records,
            "--json")
    code, out, err = call(capsys, *argv)
    assert code == 0, err
    result = json.loads(out)
    by_kind = {r["kind"]: r for r in result["records"]}
    assert sorted(by_kind) == ["perplexity", "size"] and result["reused"] == []
    ppl = next(m["value"] for m in by_kind["perplexity"]["metrics"] if m["name"] == "perplexity")
    model = AutoModelForCausalLM.from_pretrained(models["base"]).eval()
    blocks = load_blocks(models["text"], tiny_tokenizer(), 32, 160)
    assert blocks.num_blocks == 5 and by_kind["perplexity"]["data"]["fingerprint"] == blocks.fingerprint
    assert ppl == pytest.approx(plain_block_ppl(model, blocks), rel=5e-5)
    assert len(list(records.glob("*.json"))) == 2

    code, out, _ = call(capsys, *argv)
    assert code == 0
    assert sorted(json.loads(out)["reused"]) == sorted(r["key"] for r in result["records"])


def test_eval_speed_and_generation_table(capsys, models, tmp_path):
    code, out, err = call(capsys, "eval", models["base"], "--repeats", 1, "--warmup", 0, "--new-tokens", 2,
                          "--speed-batch", 2, "--prompt-len", 8, "--generate", 2, "--gen-tokens", 4,
                          "--records", tmp_path, "--json")
    assert code == 0, err
    by_kind = {r["kind"]: r for r in json.loads(out)["records"]}
    speed = {m["name"]: m for m in by_kind["speed"]["metrics"]}
    assert set(speed) == {"prefill 8 tok", "decode b=1", "decode b=2", "peak memory"}
    assert speed["decode b=2"]["unit"] == "tokens/s" and speed["decode b=2"]["samples"]
    assert by_kind["speed"]["hardware"].startswith("cpu")
    model = AutoModelForCausalLM.from_pretrained(models["base"]).eval()
    tok = tiny_tokenizer()
    for m in by_kind["generation"]["metrics"]:
        ids = tok(m["note"], return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 pad_token_id=2)
        assert m["value"] == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)

    code, out, _ = call(capsys, "eval", models["base"], "--repeats", 1, "--warmup", 0, "--new-tokens", 2,
                        "--speed-batch", 2, "--prompt-len", 8, "--generate", 2, "--gen-tokens", 4,
                        "--records", tmp_path)
    assert code == 0
    assert "decode b=2" in out and "sample 1: The capital of France is" in out and "from stored records" in out


def test_compare_one_table_as_text_markdown_and_json(capsys, models, tmp_path):
    argv = ("compare", models["base"], models["pruned"], "--data", models["text"], *NO_SPEED, "--tokens", 96,
            "--teacher", models["base"], "--records", tmp_path)
    code, out, err = call(capsys, *argv, "--json")
    assert code == 0, err
    table = json.loads(out)
    # short distinct names for the columns, the paths and the data in the legend (issue 16, item 11)
    assert table["columns"] == [models["base"].name, models["pruned"].name]
    assert f"{models['base'].name} = {models['base']}" in table["notes"]
    assert any(n.startswith("data: ") and " tokens (" in n for n in table["notes"])
    rows = {r["name"]: r for r in table["rows"]}
    assert rows["bytes on disk"]["cells"][0]["text"] and rows["bytes as checkpoint"]["cells"][1]["delta"] < 0
    rows = {r["name"]: r for r in table["rows"]}
    ppl = rows["perplexity"]["cells"]
    assert ppl[1]["delta"] == pytest.approx((ppl[1]["value"] - ppl[0]["value"]) / ppl[0]["value"])
    assert rows["params"]["cells"][1]["verdict"] == "better"
    kl = rows["KL(teacher||model)"]["cells"]
    assert kl[0]["value"] == pytest.approx(0, abs=1e-6) and kl[1]["value"] > 0
    assert rows["top-1 agreement"]["cells"][0]["value"] == 1.0

    code, out, _ = call(capsys, *argv, "--markdown")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"| metric | {models['base'].name} | {models['pruned'].name} |"
    assert any(line.startswith("| KL(teacher\\|\\|model) | 0.0000 nats |") for line in lines)

    code, out, _ = call(capsys, *argv)
    assert code == 0
    assert "perplexity" in out and "%" in out and "values from stored records" in out  # all reused

    code, _, err = call(capsys, *argv, "--json", "--markdown")
    assert code == 2 and "one of --json and --markdown" in one_error_line(err)


def test_compare_marks_numbers_measured_on_other_tokens(capsys, models, tmp_path):
    code, out, err = call(capsys, "compare", models["base"], models["shuffled"], "--data", models["text"],
                          *NO_SPEED, "--tokens", 64, "--records", tmp_path, "--json")
    assert code == 0, err
    table = json.loads(out)
    ppl = next(r for r in table["rows"] if r["name"] == "perplexity")["cells"]
    assert ppl[1]["mark"] == "†" and ppl[1]["delta"] is None
    assert any("measured on other tokens" in n for n in table["notes"])


@pytest.mark.parametrize("teacher,message", [("shuffled", "tokenizes the data differently"),
                                             ("vocab100", "vocabulary of 100 tokens")])
def test_teacher_with_other_tokenizer_or_vocabulary_skips_agreement(capsys, models, tmp_path, teacher, message):
    code, out, err = call(capsys, "eval", models["base"], "--data", models["text"], *NO_SPEED, "--tokens", 64,
                          "--teacher", models[teacher], "--records", tmp_path)
    assert code == 2
    assert message in one_error_line(err) and "agreement rows skipped" in err
    assert "perplexity" in out and "KL(" not in out  # the rest was still measured and shown


def _bad_inputs(models, tmp_path):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "short.txt").write_text("too short")
    yield ("eval", tmp_path / "not-a-model"), "not a model directory"
    yield ("eval", models["base"], "--data", tmp_path / "short.txt"), "not enough tokens for one block"
    yield ("eval", models["base"], "--data", tmp_path / "missing.txt"), "no such data file"
    yield ("eval", models["base"], "--seq-len", 4096, "--data", models["text"]), "longer than the model's context"
    yield ("eval", models["base"], "--teacher", models["base"]), "--teacher needs --data"
    yield ("compare", models["base"], tmp_path / "not-a-model", "--no-speed"), "not a model directory"
    (tmp_path / "a-file").write_text("")
    yield ("eval", models["base"], "--no-speed", "--records", tmp_path / "a-file" / "evals"), "records directory"
    if not torch.cuda.is_available():
        yield ("eval", models["base"], "--device", "cuda"), "CUDA is not available"
    from surgery.metrics.lm_eval_tasks import lm_eval_available

    if not lm_eval_available():
        yield ("eval", models["base"], "--lm-eval", "hellaswag"), "pip install lm-eval"


def test_bad_input_is_one_line_and_exit_code_2(capsys, models, tmp_path):
    for argv, message in _bad_inputs(models, tmp_path):
        if "--records" not in argv:
            argv = (*argv, "--records", tmp_path / "records")
        code, out, err = call(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in one_error_line(err), argv
    assert not (tmp_path / "records").exists() or not any((tmp_path / "records").iterdir())  # nothing written


@pytest.mark.demo
def test_demo_perplexity_matches_plain_transformers_loop(capsys, tmp_path):
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} not available")
    from surgery.errors import SourceError
    from surgery.sources import resolve_source

    try:
        path = resolve_source("smollm2-135m").path
    except SourceError as e:
        pytest.skip(f"demo model unavailable: {e}")
    threads = torch.get_num_threads()
    try:  # one thread: on a shared 2-core box, two OpenMP threads can be 10x slower than one
        code, out, err = call(capsys, "eval", "smollm2-135m", "--data", WIKITEXT, "--seq-len", 128, "--tokens",
                              384, "--no-speed", "--dtype", "float32", "--threads", 1, "--records", tmp_path, "--json")
        assert code == 0, err
        ref = _plain_demo_ppl(path)
    finally:
        torch.set_num_threads(threads)
    ppl_record = next(r for r in json.loads(out)["records"] if r["kind"] == "perplexity")
    ours = next(m["value"] for m in ppl_record["metrics"] if m["name"] == "perplexity")
    assert ppl_record["data"]["tokens"] == 384
    assert ours == pytest.approx(ref, rel=5e-5)
    assert 5 < ours < 200  # a real model on real text, not noise


def _plain_demo_ppl(path) -> float:
    # independent: plain transformers model and tokenizer, the text as one string, the first 3 blocks of 128
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(tok(WIKITEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:384])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in ids.view(3, 128)]
    return math.exp(sum(losses) / 3)
