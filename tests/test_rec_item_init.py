"""E4SRec-style item init: the LLM recommender's item table from a trained SASRec (`rec train llm --item-init`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rec_helpers import write_cycle_ratings
from surgery.rec.data import load_rec_data, prepare, save_rec_data
from tiny_models import make_model
from workbench.cli import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic data, a tiny Llama backbone and a 1-epoch 32-d SASRec (the item-table source)."""
    root = write_cycle_ratings(tmp_path_factory.mktemp("e4"), seed=0)
    save_rec_data(prepare(root, max_len=10), root / "data")
    make_model("llama").save_pretrained(root / "backbone")
    assert run(["rec", "train", "sasrec", "--data", str(root / "data"), "--out", str(root / "sasrec"), "--dim", "32",
                "--batch-size", "16", "--jobs-dir", str(root / "jobs"), "--json"]) == 0
    return root


def _source_table(root):
    return load_file(str(root / "sasrec" / "rec.safetensors"))["items.weight"]


def _cfg(root, **kw):
    from surgery.rec.train import RecJob

    return RecJob(model="llm", backbone=str(root / "backbone"), data=str(root / "data"), out=str(root / "x"),
                  item_dim=32, item_init=str(root / "sasrec"), **kw)


@pytest.mark.parametrize("frozen", [True, False])
def test_table_equals_source_and_frozen_survives_a_step(trained, frozen):
    from surgery.rec.train import build

    data = load_rec_data(trained / "data")
    module, model, _, record = build(_cfg(trained, freeze_items=frozen), data)
    source = _source_table(trained)
    assert torch.equal(model.items.weight.detach(), source)
    assert record["item_init"]["kind"] == "sasrec" and record["item_init"]["frozen"] is frozen
    in_proj = model.in_proj.weight.detach().clone()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, y = data.train_examples(list(range(16)))
    loss, _ = module.train_loss(x, y)
    loss.backward()
    opt.step()
    assert not torch.equal(model.in_proj.weight.detach(), in_proj)
    assert torch.equal(model.items.weight.detach(), source) is frozen


def test_cli_records_provenance(trained, tmp_path, capsys):
    out = tmp_path / "llm"
    assert run(["rec", "train", "llm", "--backbone", str(trained / "backbone"), "--data", str(trained / "data"),
                "--out", str(out), "--item-dim", "32", "--item-init", str(trained / "sasrec"), "--freeze-items",
                "--batch-size", "16", "--eval-users", "5", "--jobs-dir", str(tmp_path / "jobs"), "--json"]) == 0
    capsys.readouterr()
    doc = json.loads((out / "rec.json").read_text())
    assert doc["item_init"]["path"] == str(trained / "sasrec") and doc["item_init"]["frozen"] is True
    assert doc["train"]["freeze_items"] is True and doc["valid"]["users"] == 5
    # defaults differ by model: one epoch for an LLM job, tens for a SASRec (the fixture passed no --epochs)
    sasrec = json.loads((trained / "sasrec" / "rec.json").read_text())
    assert (doc["train"]["epochs"], doc["train"]["lr"]) == (1, 1e-4)
    assert (sasrec["train"]["epochs"], sasrec["train"]["lr"]) == (30, 1e-3)
    assert torch.equal(load_file(str(out / "rec.safetensors"))["items.weight"], _source_table(trained))


def test_width_or_data_mismatch_is_one_line_exit_2(trained, tmp_path, capsys):
    base = ["rec", "train", "llm", "--backbone", str(trained / "backbone"), "--item-init", str(trained / "sasrec"),
            "--jobs-dir", str(tmp_path / "jobs")]
    assert run([*base, "--data", str(trained / "data"), "--out", str(tmp_path / "a"), "--item-dim", "16"]) == 2
    msg = capsys.readouterr().err.strip()
    assert "--item-dim 32" in msg and len(msg.splitlines()) == 1
    other = write_cycle_ratings(tmp_path, seed=1, items=25)
    save_rec_data(prepare(other, max_len=10), tmp_path / "data")
    assert run([*base, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "b"), "--item-dim", "32"]) == 2
    msg = capsys.readouterr().err.strip()
    assert "other data" in msg and len(msg.splitlines()) == 1
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())  # refused before a job


def test_llm_job_with_tied_embeddings_checkpoints_and_resumes(trained, tmp_path):
    """The tiny Llama ties embed_tokens and lm_head (as SmolLM2 does): a checkpoint must still save."""
    import threading

    from surgery.rec.store import load_rec_model
    from surgery.rec.train import create_rec_job, run_rec_job

    data = load_rec_data(trained / "data")

    def job(name):
        cfg = _cfg(trained, freeze_items=True, epochs=1, batch_size=16, checkpoint_every=1, log_every=1,
                   eval_users=4)
        return create_rec_job(cfg.model_copy(update={"out": str(tmp_path / name)}), data.num_users, tmp_path / "jobs")

    run_rec_job(job("a").path)
    stopped, stop = job("b"), threading.Event()
    final = run_rec_job(stopped.path, progress=lambda m: m.startswith("step") and stop.set(), cancel=stop)
    assert final["event"] == "cancelled" and final["checkpoint"]
    assert run_rec_job(stopped.path)["event"] == "done"
    a, _, _ = load_rec_model(tmp_path / "a")
    b, _, _ = load_rec_model(tmp_path / "b")
    assert torch.equal(b.items.weight, _source_table(trained))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
