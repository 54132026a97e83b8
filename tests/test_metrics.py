"""surgery.metrics on tiny random models: every number checked against an independent computation.

Perplexity against plain-transformers loops (`labels=` loss, and Hugging Face's sliding-window recipe), agreement
against torch's kl_div, the cached decode loop against `generate`, records, the comparison table, lm-eval plumbing.
"""

from __future__ import annotations

import json
import math
import random
import string
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from surgery.data import TokenBlocks, load_blocks
from surgery.errors import UserError
from surgery.fingerprint import tokens_fingerprint
from surgery.metrics.agreement import TeacherMismatch, agreement, check_compatible
from surgery.metrics.common import Cancelled
from surgery.metrics.lm_eval_tasks import parse_tasks, run_tasks
from surgery.metrics.perplexity import perplexity, plan_windows
from surgery.metrics.records import EvalRecord, Metric, ModelRef, RecordStore, record_key
from surgery.metrics.runner import EvalSettings, ModelEval, evaluate_source
from surgery.metrics.speed import measure_speed, timed_greedy_decode
from surgery.metrics.table import MARK_DATA, build_comparison
from tiny_models import FAMILIES, VOCAB, make_model, save_tiny, tiny_tokenizer

DATA = Path(__file__).parents[2] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"


# ------------------------------------------------------------------------------------------------ helpers ----

def text_file(tmp_path: Path, chars: int = 3000) -> Path:
    """The first `chars` characters of tiny-shakespeare (or generated text when ../shared is missing)."""
    path = tmp_path / "text.txt"
    if SHAKESPEARE.is_file():
        path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    else:
        rng = random.Random(0)
        path.write_text("".join(rng.choice(string.ascii_lowercase + " \n") for _ in range(chars)), encoding="utf-8")
    return path


def random_blocks(n: int, seq_len: int, seed: int = 3) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq_len), generator=g)
    return TokenBlocks(ids, "random", tokens_fingerprint(ids), ids.numel())


@torch.no_grad()
def plain_block_ppl(model, blocks: TokenBlocks) -> float:
    """The obvious loop: transformers' own loss (labels=ids) per block, every block has seq_len - 1 targets."""
    losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks.ids]
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def hf_sliding_ppl(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """Hugging Face's sliding-window perplexity recipe, counting exactly the labels the shifted loss scores."""
    n = ids.numel()
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        inp = ids[begin:end][None]
        target = inp.clone()
        target[:, :-trg_len] = -100
        loss = model(input_ids=inp, labels=target).loss
        valid = int((target[:, 1:] != -100).sum())  # the loss shifts labels: position 0 is never a target
        nll, count, prev_end = nll + loss.item() * valid, count + valid, end
        if end == n:
            break
    return math.exp(nll / count)


# ------------------------------------------------------------------------------------------------ perplexity ----

@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_matches_plain_transformers_loop(family):
    model = make_model(family)
    blocks = random_blocks(3, 24)
    ours = perplexity(model, blocks, batch_size=2)
    assert ours.targets == blocks.num_targets == 3 * 23
    assert ours.perplexity == pytest.approx(plain_block_ppl(model, blocks), rel=5e-5)


@pytest.mark.parametrize("stride", [24, 12, 5])
def test_sliding_window_perplexity_matches_hf_recipe(stride):
    model = make_model("llama")
    blocks = random_blocks(3, 24)
    ours = perplexity(model, blocks, stride=stride, batch_size=3)
    ref = hf_sliding_ppl(model, blocks.ids.reshape(-1), 24, stride)
    assert ours.perplexity == pytest.approx(ref, rel=5e-5)
    if stride == 24:  # a stride of one window is exactly the non-overlapping number
        assert ours.perplexity == pytest.approx(perplexity(model, blocks).perplexity, rel=1e-6)
    else:  # more context per token: a different number, every token 1..N-1 scored once
        assert ours.targets == blocks.num_tokens - 1


@pytest.mark.parametrize("n,seq_len,stride", [(72, 24, None), (72, 24, 7), (50, 16, 16), (50, 16, 1)])
def test_windows_score_every_token_once(n, seq_len, stride):
    scored = []
    for w in plan_windows(n, seq_len, stride):
        assert w.end - w.begin <= seq_len and w.begin < w.first_target < w.end + 1
        scored += range(w.first_target, w.end)
    expected = [p for p in range(1, n) if (stride or seq_len) < seq_len or p % seq_len]
    assert scored == expected


def test_perplexity_rejects_bad_stride_and_stops_on_cancel():
    model = make_model("llama")
    blocks = random_blocks(2, 16)
    with pytest.raises(UserError, match="--stride"):
        perplexity(model, blocks, stride=17)
    stop = threading.Event()
    events = []

    def progress(ev):
        events.append(ev)
        if ev.done == 1:
            stop.set()

    with pytest.raises(Cancelled):
        perplexity(model, blocks, progress=progress, cancel=stop)
    assert [(e.done, e.total) for e in events] == [(0, 2), (1, 2)]


# ------------------------------------------------------------------------------------------------ agreement ----

@torch.no_grad()
def test_agreement_matches_kl_div_and_is_perfect_with_itself():
    student, teacher = make_model("qwen2", seed=1), make_model("qwen2", seed=1)
    torch.manual_seed(2)
    for p in teacher.parameters():  # a teacher close to the student: some positions agree, some do not
        p.add_(torch.randn_like(p) * 0.1)
    blocks = random_blocks(2, 20)
    r = agreement(student, teacher, blocks, top_k=3, batch_size=2)
    t = teacher(input_ids=blocks.ids).logits[:, :-1].float().log_softmax(-1)
    s = student(input_ids=blocks.ids).logits[:, :-1].float().log_softmax(-1)
    positions = t.shape[0] * t.shape[1]
    assert r.positions == positions
    assert r.kl == pytest.approx(F.kl_div(s, t, log_target=True, reduction="sum").item() / positions, rel=1e-4)
    assert r.top1 == pytest.approx((t.argmax(-1) == s.argmax(-1)).float().mean().item())
    tk, sk = t.topk(3, -1).indices.reshape(-1, 3).tolist(), s.topk(3, -1).indices.reshape(-1, 3).tolist()
    assert r.topk_overlap == pytest.approx(sum(len(set(a) & set(b)) for a, b in zip(tk, sk)) / (3 * positions))
    assert 0 < r.top1 < 1 and r.kl > 0
    same = agreement(student, student, blocks, top_k=3)
    assert same.kl == pytest.approx(0, abs=1e-6) and same.top1 == 1 and same.topk_overlap == 1


def test_teacher_with_other_vocabulary_or_tokenizer_is_refused(tmp_path):
    data = text_file(tmp_path)
    blocks = load_blocks(data, tiny_tokenizer(), 32)
    cfg = {"vocab_size": VOCAB}
    check_compatible(cfg, cfg, blocks, tiny_tokenizer())  # same tokenizer: fine
    with pytest.raises(TeacherMismatch, match="vocabulary of 100"):
        check_compatible(cfg, {"vocab_size": 100}, blocks, tiny_tokenizer())
    with pytest.raises(TeacherMismatch, match="tokenizes the data differently"):
        check_compatible(cfg, cfg, blocks, tiny_tokenizer(shuffle_seed=3))
    with pytest.raises(TeacherMismatch, match="no tokenizer"):
        check_compatible(cfg, cfg, blocks, None)


# ------------------------------------------------------------------------------------------------ speed ----

@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_cached_decode_loop_matches_generate(family):
    model = make_model(family)
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    _, tokens = timed_greedy_decode(model, prompt, 5, "cpu")
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, ref[:, 6:])


def test_measure_speed_reports_medians_samples_and_memory():
    model = make_model("llama")
    prompts = torch.randint(3, VOCAB, (3, 20))
    events = []
    r = measure_speed(model, prompts, new_tokens=3, batch=3, repeats=2, warmup=1, decode_prompt_len=4,
                      progress=events.append)
    for timing in (r.prefill_ms, r.decode_tps_1, r.decode_tps_b):
        assert len(timing.samples) == 2 and timing.median > 0
        assert timing.spread == pytest.approx((max(timing.samples) - min(timing.samples)) / 2)
    assert r.prompt_len == 20 and r.peak_memory_mib > 0
    assert r.memory_method in ("rss_high_water", "process_peak_rss")
    assert [e.done for e in events] == list(range(10)) and events[-1].total == 9
    with pytest.raises(UserError, match="prompt rows"):
        measure_speed(model, prompts, batch=4)


# ------------------------------------------------------------------------------------------------ records ----

def _record(kind="perplexity", key="sha256:ab", value=1.5, **kw) -> EvalRecord:
    return EvalRecord(kind=kind, key=key, model=ModelRef(source="m", fingerprint="sha256:m"),
                      metrics=[Metric(name="perplexity", value=value, better="lower")], **kw)


def test_record_store_round_trip_and_damaged_files(tmp_path):
    store = RecordStore(tmp_path)
    rec = _record(settings={"seq_len": 8, "stride": None})
    path = store.put(rec)
    assert json.loads(path.read_text())["version"] == 1
    assert store.get("perplexity", "sha256:ab") == rec and store.all() == [rec]
    assert store.get("perplexity", "sha256:cd") is None
    path.write_text(path.read_text().replace('"kind"', '"typo": 1, "kind"'))  # extra="forbid"
    assert store.get("perplexity", "sha256:ab") is None
    path.write_text("{not json")
    assert store.get("perplexity", "sha256:ab") is None and store.all() == []


def test_record_key_follows_what_changes_the_numbers():
    base = dict(data_fingerprint="sha256:d", device="cpu", dtype="float32", settings={"seq_len": 8})
    key = record_key("perplexity", "sha256:m", **base)
    assert key == record_key("perplexity", "sha256:m", **base)
    for change in ({"data_fingerprint": "sha256:e"}, {"dtype": "bfloat16"}, {"settings": {"seq_len": 9}}):
        assert record_key("perplexity", "sha256:m", **{**base, **change}) != key
    assert record_key("perplexity", "sha256:n", **base) != key


def test_evaluate_source_reuses_records_without_loading_weights(tmp_path, monkeypatch):
    src = save_tiny(tmp_path / "m")
    settings = EvalSettings(data=str(text_file(tmp_path)), seq_len=32, max_tokens=96, speed=False)
    store = RecordStore(tmp_path / "records")
    first = evaluate_source(str(src), settings, store=store)
    assert [r.kind for r in first.records] == ["size", "perplexity"] and not first.reused
    ppl = first.records[1].metric("perplexity").value
    assert first.records[1].data.blocks == 3 and first.records[1].data.seq_len == 32

    def no_loading(*a, **k):
        raise AssertionError("weights loaded although every record matched")

    monkeypatch.setattr("surgery.loading.load_model", no_loading)
    again = evaluate_source(str(src), settings, store=store)
    assert again.reused == {r.key for r in first.records}
    assert again.records[1].metric("perplexity").value == ppl
    with pytest.raises(AssertionError, match="weights loaded"):  # other settings: recomputed
        evaluate_source(str(src), EvalSettings(data=settings.data, seq_len=16, max_tokens=96, speed=False),
                        store=store)


def test_size_metrics_count_the_loaded_parameters(tmp_path):
    src = save_tiny(tmp_path / "m", "qwen2")
    rec = evaluate_source(str(src), EvalSettings(speed=False)).records[0]
    model = make_model("qwen2")
    assert rec.metric("params").value == sum(p.numel() for p in model.parameters())
    assert rec.metric("bytes on disk").value == (src / "model.safetensors").stat().st_size
    assert rec.settings == {"context": 128, "rows": 2}  # the tiny model's limit is below the 2048 default


# ------------------------------------------------------------------------------------------------ table ----

def _eval(label, value, data_fp="sha256:d", skipped=None, spread=None):
    rec = EvalRecord(kind="speed", key=f"sha256:{label}", model=ModelRef(source=label, fingerprint="sha256:x"),
                     metrics=[Metric(name="decode b=1", value=value, unit="tokens/s", better="higher",
                                     spread=spread)])
    ppl = EvalRecord(kind="perplexity", key=f"sha256:p{label}", model=ModelRef(source=label, fingerprint="sha256:x"),
                     data={"source": "t", "fingerprint": data_fp, "seq_len": 8, "blocks": 2, "tokens": 16},
                     metrics=[Metric(name="perplexity", value=value * 2, better="lower")])
    return ModelEval(label, rec.model, [ppl, rec], skipped=skipped or {})


def test_comparison_deltas_marks_and_markdown():
    comp = build_comparison([_eval("a", 10.0), _eval("b|c", 12.0), _eval("d", 9.0, data_fp="sha256:other"),
                             _eval("e", 10.05, spread=0.5)])
    assert [r.name for r in comp.rows] == ["perplexity", "decode b=1"]  # KINDS order, not record order
    ppl, speed = comp.rows
    assert ppl.cells[1].delta == pytest.approx(0.2) and ppl.cells[1].verdict == "worse"
    assert speed.cells[1].delta == pytest.approx(0.2) and speed.cells[1].verdict == "better"
    assert ppl.cells[2].mark == MARK_DATA and ppl.cells[2].delta is None  # other tokens: no delta
    assert speed.cells[2].verdict == "worse"  # speed does not depend on the data
    assert speed.cells[3].verdict == "same"  # within the spread
    assert any(MARK_DATA in n and "d:" in n for n in comp.notes)
    md = comp.to_markdown()
    assert md.splitlines()[0] == "| metric | a | b\\|c | d | e |"
    assert "| perplexity | 20 | 24 (+20.0%) | 18 † |" in md
    assert json.loads(json.dumps(comp.to_dict()))["rows"][0]["cells"][2]["mark"] == MARK_DATA


def test_comparison_marks_skipped_metrics():
    b = _eval("b", 5.0, skipped={"agreement": "teacher t has a vocabulary of 100 tokens"})
    a = _eval("a", 4.0)
    a.records.append(EvalRecord(kind="agreement", key="sha256:ag", model=a.model,
                                metrics=[Metric(name="top-1 agreement", value=0.9, unit="fraction")]))
    comp = build_comparison([a, b])
    row = next(r for r in comp.rows if r.kind == "agreement")
    assert row.cells[1].text == "skipped" and row.cells[1].mark == "skipped"
    assert comp.notes == ["data: t, 2 x 8 = 16 tokens (d)", "b: teacher t has a vocabulary of 100 tokens"]


def test_columns_get_short_distinct_names_and_sizes_in_other_formats_no_delta():
    from surgery.metrics.table import short_labels

    assert short_labels(["/home/u/.cache/workbench/models/smollm2-135m-q4_1", "/w/work/smollm2-a/",
                         "/w/other/smollm2-a"]) == ["smollm2-135m-q4_1", "work/smollm2-a", "other/smollm2-a"]
    evals = []
    for label, fmt, value in (("/c/base", "gguf Q4_1", 98), ("/w/out", "safetensors F32", 430)):
        rec = EvalRecord(kind="size", key=f"sha256:{label}", model=ModelRef(source=label, fingerprint="sha256:x"),
                         metrics=[Metric(name="bytes on disk", value=value, unit="bytes", better="lower", note=fmt),
                                  Metric(name="bytes as checkpoint", value=value * 5 if fmt[0] == "g" else value,
                                         unit="bytes", better="lower", note="safetensors F32")])
        evals.append(ModelEval(label, rec.model, [rec]))
    comp = build_comparison(evals)
    on_disk, checkpoint = comp.rows
    assert on_disk.cells[1].mark == MARK_DATA and on_disk.cells[1].delta is None  # 4-bit vs float32: no delta
    assert checkpoint.cells[1].delta == pytest.approx(430 / 490 - 1)  # like with like
    assert comp.columns == ["base", "out"] and "base = /c/base" in comp.notes
    assert any("gguf Q4_1" in n and "no delta" in n for n in comp.notes)


# ------------------------------------------------------------------------------------------------ lm-eval ----

def test_lm_eval_runs_through_its_python_api(monkeypatch):
    seen = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            seen.update(model=pretrained, batch_size=batch_size)

    def simple_evaluate(model, tasks, limit, num_fewshot, log_samples):
        seen.update(tasks=tasks, limit=limit)
        return {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.02,
                                         "acc_norm,none": 0.55, "acc_norm_stderr,none": "N/A"}}}

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    monkeypatch.setattr("surgery.metrics.lm_eval_tasks.lm_eval_available", lambda: True)
    model = object()
    scores = run_tasks(model, tiny_tokenizer(), parse_tasks("arc_easy, ,arc_easy"), batch_size=2, limit=10)
    assert seen == {"model": model, "batch_size": 2, "tasks": ["arc_easy"], "limit": 10}
    assert [(s.task, s.metric, s.value, s.stderr) for s in scores] == [
        ("arc_easy", "acc", 0.5, 0.02), ("arc_easy", "acc_norm", 0.55, None)]


def test_lm_eval_missing_is_a_clear_user_error(monkeypatch):
    monkeypatch.setattr("surgery.metrics.lm_eval_tasks.lm_eval_available", lambda: False)
    with pytest.raises(UserError, match="pip install lm-eval"):
        run_tasks(object(), tiny_tokenizer(), ["hellaswag"])


def test_noisy_timings_are_marked_and_measured_again_instead_of_reused(tmp_path):
    from surgery.metrics.runner import add_record

    comp = build_comparison([_eval("a", 10.0, spread=0.1), _eval("b", 10.0, spread=4.0)])
    speed = next(r for r in comp.rows if r.kind == "speed")
    assert not speed.cells[0].text.startswith("~") and speed.cells[1].text.startswith("~")
    assert any(n.startswith("~ b: decode b=1") and "noisy" in n for n in comp.notes)

    store, calls = RecordStore(tmp_path), []

    def compute(kind):
        calls.append(kind)
        spread = 5.0 if len(calls) == 1 else 0.2  # a busy machine first, then a steady one
        return [Metric(name="decode b=1", value=10.0, unit="tokens/s", better="higher", spread=spread)], {}

    for _ in range(3):
        result = ModelEval("m", ModelRef(source="m", fingerprint="sha256:m"), [])
        add_record("speed", {"settings": {}}, result, store, False, None, compute)
    assert len(calls) == 2  # the noisy record was not reused; the steady one was
