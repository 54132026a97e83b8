"""DLLM2Rec: every term on tiny hand-made rankings, the teacher-rankings cache, the folded embedding, and
`workbench rec distill-to` end to end with a tiny random LLMRec teacher (tests/tiny_models.py backbone)."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from cli_helpers import call, one_error_line
from rec_helpers import write_cycle_ratings
from surgery.errors import UserError
from surgery.rec.data import prepare, save_rec_data
from surgery.rec.dllm2rec import (
    DLLM2RecDistiller,
    confidence_weights,
    consistency_indicator,
    importance_weights,
    parse_rank_weights,
    position_weights,
    prefix_seen,
    ranking_bce,
    ranking_distillation_loss,
    sample_prefix_negatives,
    top_unseen,
)
from surgery.rec.llm import LLMRec
from surgery.rec.models import SASRec, next_item_ce
from surgery.rec.store import load_rec_model, save_rec_model
from surgery.rec.teacher_cache import load_or_build, teacher_top_k
from tiny_models import make_model


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    """48 users walking a 20-item cycle (max_len 6) and an untrained tiny-Llama LLMRec teacher saved for it."""
    root = write_cycle_ratings(tmp_path_factory.mktemp("dllm2rec"), seed=1, lengths=(7, 12))
    data = prepare(root, max_len=6)
    save_rec_data(data, root / "data")
    torch.manual_seed(0)
    teacher = LLMRec(make_model("llama"), data.num_items, item_dim=16, max_len=data.max_len).eval()
    save_rec_model(teacher, root / "teacher", record={"data": {**data.describe(), "path": str(root / "data")}})
    return root, data


# ---- the importance weights, by hand ------------------------------------------------------------------------------

def test_position_weights_are_softmax_of_minus_rank_over_beta():
    e1, e2, e3 = math.exp(-1), math.exp(-2), math.exp(-3)
    assert position_weights(3).tolist() == pytest.approx([e1 / (e1 + e2 + e3), e2 / (e1 + e2 + e3),
                                                          e3 / (e1 + e2 + e3)])
    h1, h2 = math.exp(-0.5), math.exp(-1.0)  # beta 2: ranks 1, 2 -> exp(-1/2), exp(-1)
    assert position_weights(2, beta=2.0).tolist() == pytest.approx([h1 / (h1 + h2), h2 / (h1 + h2)])


def test_confidence_weights_prefer_the_closer_candidate():
    # exp(-d) for d = 0, ln 2, ln 4 is 1, 1/2, 1/4 -> normalised 4/7, 2/7, 1/7
    d = torch.tensor([[0.0, math.log(2), math.log(4)]])
    assert confidence_weights(d)[0].tolist() == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    # beta 2 halves the distances: exp(-d/2) = 1, 1/sqrt 2, 1/2
    s = 1 + 2**-0.5 + 0.5
    assert confidence_weights(d, beta=2.0)[0].tolist() == pytest.approx([1 / s, 2**-0.5 / s, 0.5 / s])


def test_consistency_indicator_marks_candidates_in_the_students_top_k():
    cands = torch.tensor([[5, 3, 9], [1, 2, 4]])
    student = torch.tensor([[9, 1, 5], [7, 8, 6]])
    assert consistency_indicator(cands, student).tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def test_importance_weights_mix_and_normalise_per_prefix():
    w_pos = torch.tensor([0.5, 0.3, 0.2])
    w_conf = torch.tensor([[0.2, 0.2, 0.6], [0.2, 0.2, 0.6]])
    w_cons = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    w = importance_weights(w_pos, w_conf, w_cons, {"position": 1, "confidence": 1, "consistency": 1})
    # row 0: (1.7, 0.5, 1.8) / 4.0; row 1: (0.7, 0.5, 0.8) / 2.0
    assert w[0].tolist() == pytest.approx([0.425, 0.125, 0.45])
    assert w[1].tolist() == pytest.approx([0.35, 0.25, 0.4])
    # gammas (2, 0, 1): row 0 (2.0, 0.6, 1.4) / 4.0; missing names count 0
    w = importance_weights(w_pos, w_conf, w_cons, {"position": 2, "consistency": 1})
    assert w[0].tolist() == pytest.approx([0.5, 0.15, 0.35])
    # consistency only and no overlap: the prefix teaches nothing (0 weights, not NaN)
    w = importance_weights(w_pos, w_conf, w_cons, {"consistency": 1})
    assert w[1].tolist() == [0.0, 0.0, 0.0] and w[0].tolist() == pytest.approx([0.5, 0.0, 0.5])


def test_rank_weight_option_parsing():
    assert parse_rank_weights("position:1,consistency:2") == {"position": 1.0, "confidence": 0.0,
                                                             "consistency": 2.0}
    with pytest.raises(UserError, match="unknown term 'rank'"):
        parse_rank_weights("rank:1")
    with pytest.raises(UserError, match="--lambda 0"):
        parse_rank_weights("position:0")


# ---- the ranking loss, by hand ------------------------------------------------------------------------------------

def test_ranking_bce_is_minus_log_sigmoid_pos_minus_log_one_minus_sigmoid_neg():
    assert ranking_bce(torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(2 * math.log(2))
    # sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4: -ln(3/4) - ln(1 - 1/4)
    assert ranking_bce(torch.tensor(math.log(3)), torch.tensor(-math.log(3))).item() == pytest.approx(
        -2 * math.log(0.75))
    assert ranking_bce(torch.tensor(100.0), torch.tensor(-100.0)).item() == pytest.approx(0.0, abs=1e-6)


def test_ranking_distillation_loss_weights_each_candidate_and_skips_masked_prefixes():
    # one user, two prefixes, items 1..4; prefix 1 has no target (masked)
    scores = torch.tensor([[[0.0, math.log(3), 0.0, -math.log(3), 5.0],
                            [0.0, 9.0, 9.0, 9.0, 9.0]]])
    cands = torch.tensor([[[1, 2], [1, 2]]])
    weights = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]])
    negs = torch.tensor([[3, 4]])
    mask = torch.tensor([[True, False]])
    loss = ranking_distillation_loss(scores, cands, weights, negs, mask)
    # candidate 1 (score ln 3) vs negative 3 (score -ln 3): -2 ln(3/4); candidate 2 (score 0): ln 2 + ln(4/3)
    expected = 0.25 * (-2 * math.log(0.75)) + 0.75 * (math.log(2) - math.log(0.75))
    assert loss.item() == pytest.approx(expected)


def test_prefix_seen_top_unseen_and_negatives():
    inputs = torch.tensor([[2, 4, 0]])
    seen = prefix_seen(inputs, num_items=5)  # (1, 3, 6)
    assert [torch.nonzero(seen[0, t]).flatten().tolist() for t in range(3)] == [[0, 2], [0, 2, 4], [0, 2, 4]]
    scores = torch.tensor([[[9.0, 1.0, 8.0, 3.0, 7.0, 2.0]] * 3])  # padding and seen items score highest
    assert top_unseen(scores, seen, 2)[0].tolist() == [[4, 3], [3, 5], [3, 5]]
    targets = torch.tensor([[4, 1, 0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        neg = sample_prefix_negatives(seen, targets, generator=g)[0]
        assert neg[0].item() in (1, 3, 5) and neg[1].item() in (3, 5)  # never seen, never the target


# ---- collaborative embedding distillation -------------------------------------------------------------------------

def test_embedding_sum_is_used_everywhere_and_folds_into_a_plain_table():
    torch.manual_seed(0)
    student = SASRec(num_items=6, max_len=4, dim=8, layers=1).eval()
    own = student.items.weight.detach().clone()
    teacher_items = torch.randn(7, 5)
    module = DLLM2RecDistiller(student, None, None, teacher_items, gammas={}, lam=0.0, embed_distill=0.5)
    proj = student.items.parametrizations.weight[0].proj
    expected = own + 0.5 * (teacher_items @ proj.weight.t() + proj.bias)
    expected[0] = own[0]  # padding keeps its own row
    assert torch.allclose(student.items.weight, expected, atol=1e-6)
    assert torch.allclose(student.item_embeddings(), expected, atol=1e-6)
    x = torch.tensor([[1, 2, 3, 0]])
    before = student.logits(x)
    plain = module.fold()
    assert set(plain.state_dict()) == set(SASRec(num_items=6, max_len=4, dim=8, layers=1).state_dict())
    assert torch.allclose(plain.items.weight, expected, atol=1e-6)
    assert torch.allclose(plain.logits(x), before, atol=1e-5)


def test_train_loss_is_ce_plus_lambda_times_rank_and_reaches_the_projection():
    torch.manual_seed(0)
    student = SASRec(num_items=8, max_len=3, dim=8, layers=1).eval()  # no dropout: CE is recomputable
    cands = torch.tensor([[[5, 6], [6, 7], [0, 0]]])  # one user; its last position has no target
    dists = torch.tensor([[[0.1, 0.2], [0.3, 0.1], [0.0, 0.0]]])
    module = DLLM2RecDistiller(student, cands, dists, torch.randn(9, 4), gammas={"position": 1, "confidence": 1},
                               lam=0.5, embed_distill=0.3)
    x, y = torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 0]])
    torch.manual_seed(1)
    total, terms = module.train_loss(x, y, users=torch.tensor([0]))
    assert total.item() == pytest.approx(terms["ce"] + 0.5 * terms["rank-distill"], rel=1e-6)
    assert terms["ce"] == pytest.approx(next_item_ce(student.logits(x).detach(), y).item(), rel=1e-5)
    total.backward()
    assert student.items.parametrizations.weight[0].proj.weight.grad.abs().sum() > 0


# ---- teacher rankings and their cache -----------------------------------------------------------------------------

def test_teacher_top_k_matches_each_prefix_scored_alone(rec):
    root, data = rec
    teacher, _, _ = load_rec_model(root / "teacher")
    inputs, targets = data.train_examples([0, 1])
    cands, dists = teacher_top_k(teacher, inputs, targets, 3)
    items = teacher.item_embeddings()
    for u in range(2):
        for t in range(inputs.shape[1]):
            if targets[u, t] == 0:
                assert cands[u, t].tolist() == [0, 0, 0]
                continue
            prefix = inputs[u : u + 1, : t + 1]
            with torch.no_grad():
                h = teacher.hidden(prefix)[0, -1]  # the state after this prefix alone
                scores = (h @ items.t()).clone()
            scores[[0, *prefix[0].tolist()]] = float("-inf")  # padding and the prefix's own items
            best = scores.topk(3).indices
            assert cands[u, t].tolist() == best.tolist()
            assert dists[u, t].tolist() == pytest.approx((h - items[best]).norm(dim=-1).tolist(), rel=1e-4)


def test_cache_miss_then_hit_then_mismatch(rec, tmp_path, monkeypatch):
    import surgery.rec.store as store

    root, data = rec
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    first = load_or_build(root / "teacher", data, 3)
    assert not first.hit and first.path.is_file() and first.candidates.shape == (data.num_users, data.max_len, 3)
    assert torch.equal(first.items, load_rec_model(root / "teacher")[0].items.weight)  # LLMRec's items.weight

    def no_teacher(*a, **k):
        raise AssertionError("a cache hit must not load the teacher")

    monkeypatch.setattr(store, "load_rec_model", no_teacher)
    again = load_or_build(root / "teacher", data, 3)
    assert again.hit and again.path == first.path and torch.equal(again.candidates, first.candidates)
    monkeypatch.undo()
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    other_k = load_or_build(root / "teacher", data, 2)  # another key -> another file, computed
    assert not other_k.hit and other_k.path != first.path
    assert torch.equal(other_k.candidates, first.candidates[..., :2])
    # an explicit file holding another K is refused, not silently reused or overwritten
    with pytest.raises(UserError, match="another teacher, data or K"):
        load_or_build(root / "teacher", data, 3, path=other_k.path)
    # a default file whose content does not match its key (tampered) is recomputed
    first.path.write_bytes(other_k.path.read_bytes())
    fixed = load_or_build(root / "teacher", data, 3)
    assert not fixed.hit and torch.equal(fixed.candidates, first.candidates)
    with pytest.raises(UserError, match="--top-k"):
        load_or_build(root / "teacher", data, data.num_items)


# ---- the command, end to end --------------------------------------------------------------------------------------

def test_distill_to_cli_end_to_end(rec, tmp_path, monkeypatch, capsys):
    root, data = rec
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))  # its own cache: the first run must miss
    common = ["--teacher", root / "teacher", "--data", root / "data", "--top-k", "4", "--epochs", "2",
              "--batch-size", "16", "--jobs-dir", tmp_path / "jobs", "--json"]
    code, out, err = call(capsys, "rec", "distill-to", "sasrec", *common, "--weights",
                          "position:1,confidence:1,consistency:1", "--embed-distill", "0.5", "--out", tmp_path / "s")
    assert code == 0, err
    assert json.loads(out)["event"] == "done"
    model, doc, _ = load_rec_model(tmp_path / "s")
    assert doc["model"]["kind"] == "sasrec" and set(model.state_dict()) == set(SASRec(data.num_items).state_dict())
    assert doc["dllm2rec"]["teacher_cache"]["hit"] is False and doc["dllm2rec"]["embed_distill"] == 0.5
    job = sorted((tmp_path / "jobs").iterdir())[-1]
    steps = [json.loads(line) for line in (job / "events.jsonl").open()]
    losses = next(e["losses"] for e in steps if e["event"] == "step")
    assert {"ce", "rank-distill", "teacher-overlap", "total"} <= set(losses) and losses["rank-distill"] > 0
    code, out, _ = call(capsys, "rec", "eval", tmp_path / "s", "--data", root / "data", "--json")
    assert code == 0 and json.loads(out)["kind"] == "sasrec"
    # GRU4Rec from the same teacher, data and K reuses the cached rankings
    code, out, err = call(capsys, "rec", "distill-to", "gru4rec", *common, "--out", tmp_path / "g")
    assert code == 0, err
    assert json.loads((tmp_path / "g" / "rec.json").read_text())["dllm2rec"]["teacher_cache"]["hit"] is True


def test_distill_to_cancel_resume_matches_uninterrupted(rec, tmp_path, monkeypatch):
    from surgery.rec.train import RecJob, create_rec_job, run_rec_job

    root, data = rec
    monkeypatch.setenv("WORKBENCH_CACHE", str(root / "cache"))

    def job(name):
        cfg = RecJob(model="dllm2rec", student="gru4rec", teacher=str(root / "teacher"), top_k=3,
                     data=str(root / "data"), out=str(tmp_path / name), epochs=2, batch_size=16, log_every=1)
        return create_rec_job(cfg, data.num_users, tmp_path / "jobs")

    run_rec_job(job("a").path)
    stopped = job("b")
    stop = threading.Event()
    final = run_rec_job(stopped.path, progress=lambda m: stop.set() if m.startswith("step") else None, cancel=stop)
    assert final["event"] == "cancelled"
    assert run_rec_job(stopped.path)["event"] == "done"
    a, _, _ = load_rec_model(tmp_path / "a")
    b, _, _ = load_rec_model(tmp_path / "b")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("args, message", [
    (["bert4rec"], "unknown student"),
    (["sasrec", "--weights", "rank:1"], "unknown term"),
    (["sasrec", "--top-k", "500"], "--top-k"),
    (["sasrec", "--lambda", "-1"], "rank_lambda"),
])
def test_distill_to_bad_input_is_one_line_exit_2(rec, tmp_path, monkeypatch, capsys, args, message):
    root, _ = rec
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    code, _, err = call(capsys, "rec", "distill-to", *args, "--teacher", root / "teacher", "--data", root / "data",
                        "--out", tmp_path / "o", "--jobs-dir", tmp_path / "jobs")
    assert code == 2 and message in one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_distill_to_refuses_a_teacher_of_other_data(rec, tmp_path, monkeypatch, capsys):
    root, data = rec
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    other = prepare(root, max_len=5)  # same ratings, another history cap: another fingerprint
    save_rec_data(other, tmp_path / "other")
    code, _, err = call(capsys, "rec", "distill-to", "sasrec", "--teacher", root / "teacher", "--data",
                        tmp_path / "other", "--out", tmp_path / "o", "--jobs-dir", tmp_path / "jobs")
    assert code == 2 and "other data" in one_error_line(err)


def test_cancel_while_ranking_the_teacher_is_a_cancel_and_caches_nothing(rec, tmp_path, monkeypatch):
    from surgery.rec.train import RecJob, create_rec_job, run_rec_job

    root, data = rec
    cache = tmp_path / "cache"
    monkeypatch.setenv("WORKBENCH_CACHE", str(cache))
    cfg = RecJob(model="dllm2rec", student="sasrec", teacher=str(root / "teacher"), top_k=3,
                 data=str(root / "data"), out=str(tmp_path / "s"), epochs=1, batch_size=16)
    job = create_rec_job(cfg, data.num_users, tmp_path / "jobs")

    def cancel_on_rankings(message):  # the user runs `workbench jobs cancel` while the teacher ranks
        if message.startswith("loading the teacher"):
            job.cancel_file.write_text("")

    final = run_rec_job(job.path, progress=cancel_on_rankings)
    assert final["event"] == "cancelled" and final["step"] == 0 and final["checkpoint"] is None
    assert not list(cache.rglob("*.safetensors")), "a cancelled ranking must not be cached"
    assert not (tmp_path / "s").exists()
    job.cancel_file.unlink()
    assert run_rec_job(job.path)["event"] == "done"
