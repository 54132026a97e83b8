"""`workbench compare` / `eval` with rec model directories: HR/NDCG/MRR rows beside the size and LM rows, equal to
`surgery.rec.metrics.evaluate` on the same model and data; baselines (not LMs) leave LM rows blank; a model
trained on other data than --rec-data is refused with one line."""

from __future__ import annotations

import json
import random

import pytest
import torch

from cli_helpers import call, one_error_line
from surgery.estimate import count_params
from surgery.rec.data import prepare, save_rec_data
from surgery.rec.llm import LLMRec
from surgery.rec.metrics import evaluate
from surgery.rec.models import SASRec
from surgery.rec.store import load_rec_model, save_rec_model
from test_metrics import text_file
from tiny_models import make_model, tiny_tokenizer

PROTOCOLS = ("full", "sampled-999")
KEYS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")


def _data(root, seed: int, items: int):
    """A prepared synthetic catalogue of `items` items (sampled-999 needs 1,000 unseen items per user)."""
    rng = random.Random(seed)
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(30):
        for t in range(rng.randint(6, 12)):
            lines.append(f"{u},{rng.randrange(items)},5,{1000 + t}")
    for f in range(items // 5):  # 25 items per extra user, every item 5 times: the 5-core filter keeps them all
        lines += [f"{100 + f},{(f * 25 + j) % items},4,{j}" for j in range(25)]
    root.mkdir()
    (root / "ratings.csv").write_text("\n".join(lines) + "\n")
    data = prepare(root, max_len=10)
    save_rec_data(data, root / "data")
    return root / "data", data


def _save(model, out, data, tokenizer=None):
    record = {"data": {**data.describe(), "path": "synthetic"}, "params": count_params(model)}
    return save_rec_model(model.eval(), out, record=record, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec-compare")
    path, data = _data(root / "a", 0, 1100)
    other_path, other = _data(root / "b", 1, 1200)
    torch.manual_seed(0)
    llm = _save(LLMRec(make_model("llama"), data.num_items, item_dim=16, max_len=data.max_len), root / "llm", data,
                tiny_tokenizer())
    sasrec = _save(SASRec(data.num_items, data.max_len, dim=16), root / "sasrec", data)
    foreign = _save(SASRec(other.num_items, other.max_len, dim=16), root / "foreign", other)
    return {"data": path, "rec_data": data, "other": other_path, "llm": llm, "sasrec": sasrec, "foreign": foreign,
            "text": text_file(root)}


def _rows(table: dict) -> dict[str, dict]:
    return {r["name"]: r for r in table["rows"]}


def test_compare_rec_rows_equal_evaluate(rec, tmp_path, capsys):
    argv = ("compare", rec["llm"], rec["sasrec"], "--rec-data", rec["data"], "--rec-max-users", 20, "--data",
            rec["text"], "--seq-len", 32, "--tokens", 64, "--no-speed", "--records", tmp_path)
    code, out, err = call(capsys, *argv, "--json")
    assert code == 0, err
    table = json.loads(out)
    rows = _rows(table)
    users = list(range(20))
    for col, name in enumerate(("llm", "sasrec")):
        net, _, _ = load_rec_model(rec[name])
        with torch.no_grad():
            expected = evaluate(net.score, rec["rec_data"], protocols=PROTOCOLS, users=users)
        for p in PROTOCOLS:
            for k in KEYS:
                row = rows[f"rec {p} {k}"]
                assert row["better"] == "higher" and row["kind"] == "rec"
                assert row["cells"][col]["value"] == pytest.approx(expected[p][k], abs=1e-12), (name, p, k)
        assert rows["rec params"]["cells"][col]["value"] == count_params(net)
        assert rows["rec s/1k users"]["cells"][col]["value"] > 0
    # the LLM recommender is also a language model; the baseline is not: its LM rows are blank, not an error
    assert rows["perplexity"]["cells"][0]["value"] > 1
    assert rows["perplexity"]["cells"][1]["value"] is None and rows["perplexity"]["cells"][1]["text"] == "-"
    sas_tensors = load_rec_model(rec["sasrec"])[0].state_dict()
    assert rows["params"]["cells"][1]["value"] == sum(t.numel() for t in sas_tensors.values())
    assert rows["rec params"]["cells"][1]["delta"] is not None  # compared with deltas like any row
    # the rec record carries the split's fingerprint; a second run reuses it (and prints the same rows)
    code, out, _ = call(capsys, *argv, "--json")
    again = _rows(json.loads(out))
    assert code == 0 and again == {name: {**row, "cells": [{**c, "reused": c["value"] is not None}
                                                           for c in row["cells"]]} for name, row in rows.items()}
    recs = [json.loads(p.read_text()) for p in tmp_path.glob("rec-*.json")]
    assert len(recs) == 2 and {r["data"]["fingerprint"] for r in recs} == {rec["rec_data"].fingerprint}
    assert {r["settings"]["users"] for r in recs} == {20}


def test_baseline_and_llm_without_rec_data_and_eval(rec, tmp_path, capsys):
    code, out, err = call(capsys, "compare", rec["sasrec"], rec["llm"], "--no-speed", "--records", tmp_path,
                          "--json")
    assert code == 0, err
    rows = _rows(json.loads(out))
    assert not [name for name in rows if name.startswith("rec ")]
    assert all(c["value"] > 0 for c in rows["params"]["cells"]) and rows["params"]["cells"][1]["delta"] > 0
    code, out, err = call(capsys, "eval", rec["sasrec"], "--rec-data", rec["data"], "--records", tmp_path, "--json")
    assert code == 0, err
    assert [r["kind"] for r in json.loads(out)["records"]] == ["size", "rec"]


def test_rec_data_mismatch_and_bad_flags_one_line(rec, tmp_path, capsys):
    code, _, err = call(capsys, "compare", rec["sasrec"], rec["foreign"], "--rec-data", rec["data"], "--records",
                        tmp_path)
    assert code == 2 and "trained on other data" in one_error_line(err)
    assert not list(tmp_path.glob("*.json"))  # refused before the first model was evaluated
    code, _, err = call(capsys, "compare", rec["sasrec"], "--rec-max-users", 5, "--records", tmp_path)
    assert code == 2 and "--rec-max-users needs --rec-data" in one_error_line(err)
    code, _, err = call(capsys, "compare", rec["sasrec"], "--rec-data", rec["text"], "--records", tmp_path)
    assert code == 2 and "not a prepared rec data directory" in one_error_line(err)
