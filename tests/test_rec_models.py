"""SASRec, GRU4Rec, the LLM recommender and SLMRec distillation on synthetic data and a tiny random Llama."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from rec_helpers import write_cycle_ratings
from surgery.errors import UserError
from surgery.rec.data import prepare, save_rec_data
from surgery.rec.distill import block_pairs, parse_losses
from surgery.rec.llm import LLMRec, pick_layers, shallow_copy
from surgery.rec.models import GRU4Rec, SASRec
from surgery.rec.store import load_rec_model
from tiny_models import make_model
from workbench.cli import run


@pytest.fixture(scope="module")
def rec_data(tmp_path_factory):
    """A synthetic catalogue where each user walks items in a fixed cycle: easy to learn, cheap to train."""
    root = write_cycle_ratings(tmp_path_factory.mktemp("rec"), seed=0)
    data = prepare(root, max_len=10)
    save_rec_data(data, root / "data")
    make_model("llama").save_pretrained(root / "backbone")
    return root, data


@pytest.mark.parametrize("cls", [SASRec, GRU4Rec])
def test_baselines_predict_every_position_causally(cls, rec_data):
    _, data = rec_data
    torch.manual_seed(0)
    model = cls(data.num_items).eval()
    x, _ = data.train_examples(list(range(4)))
    logits = model.logits(x)
    assert logits.shape == (4, data.max_len, data.num_items + 1)
    changed = x.clone()
    changed[:, 5:] = 1  # later items must not change earlier predictions
    assert torch.allclose(model.logits(changed)[:, :5], logits[:, :5], atol=1e-5)


@pytest.mark.parametrize("kind", ["sasrec", "gru4rec"])
def test_train_eval_cli_beats_untrained(kind, rec_data, tmp_path, capsys):
    root, data = rec_data
    out = tmp_path / kind
    assert run(["rec", "train", kind, "--data", str(root / "data"), "--out", str(out), "--epochs", "15", "--dim", "32",
                "--batch-size", "16", "--lr", "1e-2", "--jobs-dir", str(tmp_path / "jobs"), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["event"] == "done"
    assert run(["rec", "eval", str(out), "--data", str(root / "data"), "--protocol", "full", "--protocol",
                "sampled-5", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    # the cyclic walk is learnable: far better than the random ranking's HR@5 of 5 / 14 unseen items
    assert metrics["full"]["hr@5"] > 0.6
    assert metrics["sampled-5"]["users"] == data.num_users
    events = [json.loads(line) for line in (next((tmp_path / "jobs").iterdir()) / "events.jsonl").open()]
    assert [e["event"] for e in events][-2:] == ["eval", "done"]


def test_cancel_checkpoint_resume_matches_uninterrupted(rec_data, tmp_path):
    from surgery.rec.train import RecJob, create_rec_job, run_rec_job

    root, data = rec_data

    def job(name):
        cfg = RecJob(model="gru4rec", data=str(root / "data"), out=str(tmp_path / name), epochs=2, batch_size=8)
        return create_rec_job(cfg, data.num_users, tmp_path / "jobs")

    straight = job("a")
    run_rec_job(straight.path)
    stopped = job("b")
    stop = threading.Event()
    calls = []

    def progress(message):  # cancel after the first logged step
        calls.append(message)
        if message.startswith("step"):
            stop.set()

    final = run_rec_job(stopped.path, progress=progress, cancel=stop)
    assert final["event"] == "cancelled" and final["checkpoint"]
    assert run_rec_job(stopped.path)["event"] == "done"
    a, _, _ = load_rec_model(tmp_path / "a")
    b, _, _ = load_rec_model(tmp_path / "b")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_llm_recommender_roundtrip_and_lora(rec_data, tmp_path, capsys):
    root, data = rec_data
    for mode in ("--full", "--lora"):
        out = root / f"llm-{mode.strip('-')}"
        assert run(["rec", "train", "llm", "--backbone", str(root / "backbone"), "--data", str(root / "data"),
                    "--out", str(out), "--batch-size", "16", mode, "--jobs-dir", str(tmp_path / "jobs"),
                    "--json"]) == 0
        capsys.readouterr()
        assert (out / "config.json").is_file() and (out / "rec.safetensors").is_file()
        model, doc, _ = load_rec_model(out)
        assert doc["model"]["kind"] == "llm" and doc["backbone"]["fingerprint"].startswith("sha256:")
        h, n, _ = data.eval_examples(users=[0, 1])
        assert model.score(h, n).shape == (2, data.num_items + 1)
        # the backbone dir is a plain HF model: inspect reads it; it was trained (LoRA merged in)
        assert run(["inspect", str(out), "--json"]) == 0
        capsys.readouterr()
        from safetensors.torch import load_file

        k = "model.layers.0.mlp.up_proj.weight"
        assert not torch.equal(load_file(str(out / "model.safetensors"))[k],
                               load_file(str(root / "backbone" / "model.safetensors"))[k])


def test_layer_picks_and_block_pairs():
    assert pick_layers(30, 8) == list(range(8))
    assert pick_layers(30, 3, "spaced") == [9, 19, 29]
    assert block_pairs(8, 30, 4) == [(1, 6), (3, 14), (5, 21), (7, 29)]
    with pytest.raises(UserError):
        pick_layers(3, 4)
    assert parse_losses("ce:1,hidden-cos:1,hidden-l2:0.1,block-ce:0.1")["hidden-l2"] == 0.1
    with pytest.raises(UserError, match="unknown loss"):
        parse_losses("kl:1")


def test_shallow_copy_keeps_teacher_blocks():
    teacher = LLMRec(make_model("llama"), num_items=10).eval()
    student = shallow_copy(teacher, [0, 2]).eval()
    assert student.num_layers == 2 and student.lm.config.num_hidden_layers == 2
    t_layers, s_layers = teacher.lm.model.layers, student.lm.model.layers
    assert torch.equal(s_layers[1].mlp.up_proj.weight, t_layers[2].mlp.up_proj.weight)
    assert torch.equal(student.items.weight, teacher.items.weight)


def test_distill_cli_all_losses(rec_data, tmp_path, capsys):
    root, data = rec_data
    teacher = root / "llm-full"
    if not teacher.is_dir():
        pytest.skip("needs the teacher of test_llm_recommender_roundtrip_and_lora")
    student = tmp_path / "student"
    assert run(["rec", "distill", "--teacher", str(teacher), "--student-layers", "2", "--data", str(root / "data"),
                "--loss", "ce:1,hidden-cos:1,hidden-l2:0.1,block-ce:0.1", "--out", str(student), "--batch-size",
                "16", "--jobs-dir", str(tmp_path / "jobs"), "--json"]) == 0
    capsys.readouterr()
    doc = json.loads((student / "rec.json").read_text())
    assert doc["block_pairs"] == [[0, 0], [1, 2]] and json.loads((student / "config.json").read_text())[
        "num_hidden_layers"] == 2
    job = sorted((tmp_path / "jobs").iterdir())[-1]
    steps = [json.loads(line) for line in (job / "events.jsonl").open() if '"step"' in line]
    losses = next(e["losses"] for e in steps if e["event"] == "step")
    assert set(losses) == {"ce", "hidden-cos", "hidden-l2", "block-ce", "total"}
    assert all(v > 0 for v in losses.values())
    # bad input: a student deeper than the teacher exits 2
    assert run(["rec", "distill", "--teacher", str(teacher), "--student-layers", "9", "--data", str(root / "data"),
                "--out", str(tmp_path / "bad"), "--jobs-dir", str(tmp_path / "jobs")]) == 2
