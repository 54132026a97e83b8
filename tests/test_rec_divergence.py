"""Rec training that diverges (NaN / inf) stops with one line, keeps its last checkpoint and writes no output;
a model that scores NaN is refused instead of ranking every target first; evaluation options that leave nothing
to score are one line."""

from __future__ import annotations

import json
import pytest
import torch
from cli_helpers import call

from rec_helpers import write_cycle_ratings
from surgery.errors import UserError
from surgery.jobs.checkpoint import latest_checkpoint
from surgery.rec.data import prepare, save_rec_data
from surgery.rec.store import load_rec_model, save_rec_model
from surgery.rec.train import RecJob, create_rec_job, run_rec_job


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = write_cycle_ratings(tmp_path_factory.mktemp("rec"), seed=0, users=24)
    save_rec_data(prepare(root, max_len=10), root / "data")
    return root / "data"


def events(jobs_dir):
    job = next(jobs_dir.iterdir())
    return [json.loads(line) for line in (job / "events.jsonl").open()]


def test_absurd_lr_stops_at_the_step_with_one_line_and_no_output(capsys, data_dir, tmp_path):
    out = tmp_path / "sasrec"
    code, _, err = call(capsys, "rec", "train", "sasrec", "--data", data_dir, "--out", out, "--epochs", "3",
                        "--batch-size", "8", "--lr", "1e30", "--jobs-dir", tmp_path / "jobs")
    assert code == 2, err
    last = err.strip().splitlines()[-1]  # after the one "job ... (foreground ...)" note
    assert last.startswith("error: training diverged at step 1: ") and "lower --lr (it was 1e+30)" in last, err
    assert "Traceback" not in err
    assert not out.exists()
    final = events(tmp_path / "jobs")[-1]
    assert final["event"] == "failed" and final["error_type"] == "TrainingDiverged"


@pytest.mark.parametrize("lr", ["inf", "nan"])
def test_non_finite_lr_is_refused_before_a_job_exists(capsys, data_dir, tmp_path, lr):
    code, _, err = call(capsys, "rec", "train", "gru4rec", "--data", data_dir, "--out", tmp_path / "o", "--lr", lr,
                        "--jobs-dir", tmp_path / "jobs")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())


def test_divergence_after_a_checkpoint_keeps_that_checkpoint(data_dir, tmp_path):
    # lr 1e12: step 1 leaves finite (huge) weights, step 2's loss is NaN
    cfg = RecJob(model="sasrec", data=str(data_dir), out=str(tmp_path / "out"), epochs=3, batch_size=8, lr=1e12,
                 checkpoint_every=1)
    job = create_rec_job(cfg, 24, tmp_path / "jobs")
    with pytest.raises(UserError, match=r"diverged at step 2: ce = nan.*the last checkpoint \(step-0+1\) is intact"):
        run_rec_job(job.path)
    assert not (tmp_path / "out").exists()
    path, tensors, meta = latest_checkpoint(job.checkpoints_dir)
    assert meta["step"] == 1 and all(bool(torch.isfinite(v).all()) for k, v in tensors.items()
                                     if k.startswith("student."))
    assert not [p for p in job.checkpoints_dir.rglob("*") if ".tmp" in p.name]  # nothing half-written


def test_eval_of_a_nan_model_is_refused(capsys, data_dir, tmp_path):
    code, _, err = call(capsys, "rec", "train", "sasrec", "--data", data_dir, "--out", tmp_path / "good",
                        "--epochs", "1", "--jobs-dir", tmp_path / "jobs", "--json")
    assert code == 0, err
    model, doc, _ = load_rec_model(tmp_path / "good")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_rec_model(model, tmp_path / "nan", record={k: v for k, v in doc.items() if k not in ("version", "kind",
                                                                                             "model")})
    code, out, err = call(capsys, "rec", "eval", tmp_path / "nan", "--data", data_dir)
    assert code == 2 and "scores items as NaN" in err and "HR@10" not in out, err


@pytest.mark.parametrize("option, expected", [("--max-users", "no users to evaluate"),
                                              ("--batch-size", "--batch-size must be at least 1")])
def test_eval_with_nothing_to_score_is_one_line(capsys, data_dir, tmp_path, option, expected):
    code, _, err = call(capsys, "rec", "train", "gru4rec", "--data", data_dir, "--out", tmp_path / "m",
                        "--epochs", "1", "--jobs-dir", tmp_path / "jobs", "--json")
    assert code == 0, err
    code, _, err = call(capsys, "rec", "eval", tmp_path / "m", "--data", data_dir, option, "0")
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err  # was ValueError, exit 1


def test_resume_of_a_done_job_is_refused_and_its_output_kept(capsys, data_dir, tmp_path):
    code, out, err = call(capsys, "rec", "train", "gru4rec", "--data", data_dir, "--out", tmp_path / "m",
                          "--epochs", "1", "--jobs-dir", tmp_path / "jobs", "--json")
    assert code == 0, err
    job_id = json.loads(out)["job"]
    before = (tmp_path / "m" / "rec.safetensors").stat().st_mtime_ns
    code, _, err = call(capsys, "rec", "resume", job_id, "--jobs-dir", tmp_path / "jobs")
    assert code == 2 and "is done: nothing to resume" in err, err  # it trained again and replaced the output
    assert (tmp_path / "m" / "rec.safetensors").stat().st_mtime_ns == before
