"""surgery.rec.data: filtering, k-core, time order, leave-one-out, history cap, save/load, fingerprint, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgery.errors import UserError
from surgery.rec.data import k_core, load_rec_data, prepare, save_rec_data
from workbench.cli import run

MOVIELENS = Path(__file__).parents[2] / "shared" / "data" / "movielens-latest-small"


def write_ratings(path: Path, rows, header="userId,movieId,rating,timestamp") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + [",".join(str(x) for x in r) for r in rows]
    (path / "ratings.csv").write_text("\n".join(lines) + "\n")
    return path


def test_k_core_repeats_until_stable():
    # item "z" has 1 user; dropping it leaves user "b" with 1 item, which must then go too (a second round)
    pairs = [("a", i, 0) for i in "xy"] + [("b", "z", 0), ("b", "x", 0)] + [("c", i, 0) for i in "xy"]
    kept = k_core(pairs, 2)
    assert {u for u, _, _ in kept} == {"a", "c"}
    assert {i for _, i, _ in kept} == {"x", "y"}


def test_positive_filter_time_order_and_leave_one_out(tmp_path):
    rows = []
    for u in (1, 2, 3):
        for t, item in enumerate([10, 20, 30, 40, 50, 60]):
            rows.append((u, item, 5.0, 1000 - t))  # written newest first: the split must sort by time
        rows.append((u, 70, 3.0, 5000))  # rating 3 is not > 3: dropped
    data = prepare(write_ratings(tmp_path, rows), core=3, max_len=3)
    assert (data.num_users, data.num_items, data.num_interactions) == (3, 6, 18)
    assert data.item_ids == ["10", "20", "30", "40", "50", "60"]
    assert data.sequence(0).tolist() == [6, 5, 4, 3, 2, 1]  # oldest first
    hist, lengths, targets = data.eval_examples("test")
    assert targets.tolist() == [1, 1, 1] and hist[0].tolist() == [4, 3, 2] and lengths.tolist() == [3, 3, 3]
    hist, lengths, targets = data.eval_examples("valid")
    assert targets[0] == 2 and hist[0].tolist() == [5, 4, 3]
    inputs, next_items = data.train_examples()
    # training part is [6, 5, 4, 3]; capped to the last max_len + 1 = 4 items
    assert inputs[0].tolist() == [6, 5, 4] and next_items[0].tolist() == [5, 4, 3]


def test_headerless_and_string_ids(tmp_path):
    rows = [(f"U{u}", f"B00{i}", 5, 100 + i) for u in range(3) for i in range(5)]
    data = prepare(write_ratings(tmp_path, rows, header=None), core=3)
    assert data.num_users == 3 and data.item_ids[0] == "B000"


def test_bad_input_is_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="no ratings file"):
        prepare(tmp_path)
    write_ratings(tmp_path, [(1, 2, "five", 3)])
    with pytest.raises(UserError, match=":2:"):
        prepare(tmp_path)


def test_save_load_roundtrip_and_tamper(tmp_path):
    rows = [(u, i, 4.5, u * 10 + i) for u in range(6) for i in range(6)]
    data = prepare(write_ratings(tmp_path / "in", rows), core=5)
    save_rec_data(data, tmp_path / "out")
    again = load_rec_data(tmp_path / "out")
    assert again.fingerprint == data.fingerprint and again.items.equal(data.items)
    meta = json.loads((tmp_path / "out" / "data.json").read_text())
    meta["item_ids"][0] = "999"
    (tmp_path / "out" / "data.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="fingerprint"):
        load_rec_data(tmp_path / "out")


def test_movielens_prepare_cli(tmp_path, capsys):
    if not MOVIELENS.is_dir():
        pytest.skip("MovieLens latest-small is not in ../shared/data")
    assert run(["rec", "prepare", str(MOVIELENS), "--out", str(tmp_path / "a"), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["users"], first["items"], first["interactions"]) == (602, 2412, 53371)
    data = load_rec_data(tmp_path / "a")
    lengths = data.offsets.diff()
    assert int(lengths.min()) >= 5
    # deterministic: a second run gives the same fingerprint
    assert run(["rec", "prepare", str(MOVIELENS), "--out", str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fingerprint"] == first["fingerprint"]
    # an existing output without --overwrite is refused with exit 2
    assert run(["rec", "prepare", str(MOVIELENS), "--out", str(tmp_path / "a")]) == 2
