"""`workbench compress` as a job: a cancel reaches its redistillation job, a SIGKILL takes that job with it, and a
resume continues from the phase reached with the uninterrupted run's bytes; the run is recorded in its session."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from surgery.compress import CompressCancelled, CompressOptions, compress
from surgery.jobs.status import job_status
from surgery.jobs.store import JobDir, find_job
from surgery.processes import pid_alive
from cli_helpers import call, one_error_line
from test_jobs import env, events_of, one_thread, wait_until  # noqa: F401 (fixtures)

# 48 tokens a step: 200 redistillation steps (a checkpoint every 50), long enough for a cancel to land mid-training
OPTIONS = dict(seq_len=24, batch_size=2, calib_tokens=960, calib_seq_len=48, recon_tokens=720, recon_seq_len=36,
               eval_tokens=240, eval_seq_len=24)
TOKENS = 200 * 48


def options(env) -> CompressOptions:
    return CompressOptions(data=str(env / "data.txt"), tokens=TOKENS, eval_data=str(env / "data.txt"), **OPTIONS)


def model_files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(Path(path).glob("*.safetensors"))}


def same_scores(a: Path, b: Path) -> bool:
    """Equal score tensors and metadata, apart from the scoring's wall time (`seconds`)."""
    from safetensors import safe_open

    fa, fb = safe_open(str(a), "pt"), safe_open(str(b), "pt")
    meta_a, meta_b = ({k: v for k, v in f.metadata().items() if k != "seconds"} for f in (fa, fb))
    return meta_a == meta_b and set(fa.keys()) == set(fb.keys()) and all(
        fa.get_tensor(k).equal(fb.get_tensor(k)) for k in fa.keys())


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """One uninterrupted run (in this process): what every interrupted and resumed run must reproduce."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reference")
    record = compress(str(env / "teacher"), 0.8, root / "out", options(env), jobs_root=root / "jobs",
                      work=root / "work")
    return root, record


def test_resume_reuses_finished_phases_and_gives_the_uninterrupted_bytes(env, tmp_path, reference, monkeypatch):
    ref_root, ref_record = reference
    work, out, seen = tmp_path / "work", tmp_path / "out", []
    cancel = threading.Event()

    def cancel_after_scoring(message: str) -> None:
        seen.append(message)
        if message == "scoring":
            cancel.set()  # checked when the scoring is done: nothing after it starts

    with pytest.raises(CompressCancelled):
        compress(str(env / "teacher"), 0.8, out, options(env), jobs_root=tmp_path / "jobs", work=work,
                 progress=cancel_after_scoring, cancel=cancel)
    assert (work / "scores.safetensors").is_file() and not (work / "plan.json").exists() and not out.exists()

    def killed_before_redistilling(message: str) -> None:
        seen.append(message)
        if message.startswith("stage 1"):
            raise KeyboardInterrupt  # as if the process died between the cut and the redistillation

    import surgery.importance.pipeline as scoring

    real_score = scoring.score_source
    monkeypatch.setattr(scoring, "score_source", lambda *a, **k: pytest.fail("finished scoring was recomputed"))
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        compress(str(env / "teacher"), 0.8, out, options(env), jobs_root=tmp_path / "jobs", work=work,
                 progress=killed_before_redistilling)
    assert seen[0].startswith("scoring: done before, reused") and "suggesting a plan" in seen
    assert not out.exists()

    seen.clear()
    record = compress(str(env / "teacher"), 0.8, out, options(env), jobs_root=tmp_path / "jobs", work=work,
                      progress=seen.append)
    monkeypatch.setattr(scoring, "score_source", real_score)
    assert [m.split(":")[0] for m in seen[:4]] == ["scoring", "suggesting a plan", "measuring the base model",
                                                   "stage 0"]
    assert all("done before, reused" in m for m in seen[:4]) and "stage 1: redistill" in seen
    for name in ("plan.json", "pipeline.json"):  # they name the score file, in their own work directory
        text = (work / name).read_text().replace(str(work), "WORK")
        assert text == (ref_root / "work" / name).read_text().replace(str(ref_root / "work"), "WORK"), name
    assert same_scores(work / "scores.safetensors", ref_root / "work" / "scores.safetensors")
    assert model_files(out) == model_files(ref_root / "out") and model_files(out)
    numbers = [(s["after"]["params"], s["after"]["perplexity"]) for s in record["stages"]]
    assert numbers == [(s["after"]["params"], s["after"]["perplexity"]) for s in ref_record["stages"]]
    # another budget in the same work directory is refused, nothing changes
    with pytest.raises(Exception, match="another budget"):
        compress(str(env / "teacher"), 0.7, tmp_path / "out2", options(env), jobs_root=tmp_path / "jobs", work=work)


def start(env, jobs_dir: Path, out: Path) -> JobDir:
    from workbench.compress_job import start_compress

    fields = {"source": str(env / "teacher"), "target_params": "0.8", "data": str(env / "data.txt"),
              "tokens": str(TOKENS), "out": str(out), "eval_data": str(env / "data.txt"),
              "options": " ".join(f"{k}={v}" for k, v in OPTIONS.items() if k != "eval_data")}
    return find_job(jobs_dir, start_compress(jobs_dir, fields))


def sub_job(job: JobDir) -> JobDir | None:
    from workbench.compress_job import sub_jobs

    ids = sub_jobs(job)
    return JobDir(job.path.parent / ids["1"]) if "1" in ids else None


def sub_events(job: JobDir, kind: str) -> list[dict]:
    sub = sub_job(job)
    return [e for e in events_of(sub) if e["event"] == kind] if sub is not None else []


def test_cancel_reaches_the_redistillation_and_sigkill_takes_it_along_then_resume_finishes(
        capsys, env, tmp_path, reference):
    """Real detached processes: cancel mid-redistillation -> both cancelled; resume; SIGKILL after a checkpoint ->
    both lost, no process left; resume again -> the uninterrupted run's weights."""
    from sessions import Session, describe_source

    ref_root, ref_record = reference
    session = Session.create("tiny", describe_source(str(env / "teacher")), root=tmp_path / "home" / "sessions")
    session.close()  # the recipe runs in the session (its jobs/), as from the TUI's jobs panel
    jobs = ["--jobs-dir", session.path / "jobs"]
    job = start(env, session.path / "jobs", tmp_path / "out")
    wait_until(lambda: sub_events(job, "step"), timeout=300)
    sub = sub_job(job)
    assert job_status(sub).state == "running"  # it holds its own lock while it trains inside the recipe's process
    code, stdout, err = call(capsys, "jobs", "cancel", job.id, "--wait", *jobs)
    assert code == 0 and "cancel requested" in stdout, err
    assert job_status(job).state == "cancelled" and job_status(sub).state == "cancelled"
    final = events_of(sub)[-1]
    assert final["event"] == "cancelled" and 0 < final["step"] < 200 and final["checkpoint"]
    code, stdout, _ = call(capsys, "jobs", "list", "--json", *jobs)
    states = {s["id"]: s["state"] for s in json.loads(stdout)}
    assert states == {job.id: "cancelled", sub.id: "cancelled"}
    code, stdout, _ = call(capsys, "jobs", "show", job.id, *jobs)
    assert code == 0 and f"stage 1 job {sub.id}: cancelled at step {final['step']}/200" in stdout

    code, stdout, err = call(capsys, "jobs", "resume", job.id, *jobs)
    assert code == 0 and "resumed" in stdout, err
    pid = job.read_process()["pid"]
    cancelled_at = final["step"]
    wait_until(lambda: any(e["step"] > cancelled_at for e in sub_events(job, "checkpoint")), timeout=300)
    code, _, err = call(capsys, "jobs", "resume", job.id, *jobs)
    assert code == 2 and "already running" in one_error_line(err)
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), timeout=30)
    # the sub-job died with it; the locks go when the last process of the group has exited, which on a loaded box
    # can come a moment after the recorded pid's exit
    wait_until(lambda: (job_status(job).state, job_status(sub).state) == ("lost", "lost"), timeout=30)

    code, _, err = call(capsys, "jobs", "resume", job.id, "--foreground", *jobs)
    assert code == 0, err
    assert job_status(job).state == "done" and job_status(sub).state == "done"
    starts = [e for e in events_of(sub) if e["event"] == "start"]
    assert [bool(s["resumed_from"]) for s in starts] == [False, True, True] and starts[-1]["step"] > cancelled_at
    assert model_files(tmp_path / "out") == model_files(ref_root / "out")
    code, _, err = call(capsys, "jobs", "resume", job.id, *jobs)
    assert code == 2 and "is done" in one_error_line(err)

    # recorded in the session: `sessions show` lists the run's metrics before/after each stage and its plan, the
    # job states are the jobs' own, and the scores are kept in scores/ (where the TUI picks them up)
    code, stdout, err = call(capsys, "sessions", "show", "tiny", "--home", tmp_path / "home", "--json")
    assert code == 0, err
    contents = json.loads(stdout)["contents"]
    assert {j["id"]: j["status"] for j in contents["jobs"]} == {job.id: "done", sub.id: "done"}
    assert contents["scores"] == [f"{job.id}.safetensors"]
    [run] = contents["compress"]
    assert run["id"] == job.id and run["state"] == "done" and run["out"] == str(tmp_path / "out")
    want = [("base", ref_record["metrics"]["before"])] + [(s["stage"], s["after"]) for s in ref_record["stages"]]
    assert [(m["stage"], m["params"], m["perplexity"]) for m in run["metrics"]] == [
        (name, m["params"], m["perplexity"]) for name, m in want]
    assert run["plan"] == str(job.path / "plan.json") and run["plan_ops"]["reconstruct"] == 1
    code, stdout, _ = call(capsys, "sessions", "show", "tiny", "--home", tmp_path / "home")
    assert code == 0 and f"compress  {job.id}: done" in stdout and "redistill" in stdout and "x)" in stdout


def test_compress_into_a_session_refuses_bad_input_before_making_anything(capsys, env, tmp_path):
    home = tmp_path / "home"
    base = ["compress", env / "teacher", "--target-params", 0.8, "--data", env / "data.txt", "--seq-len", 24,
            "--batch-size", 2, "--home", home]
    code, _, err = call(capsys, *base, "--tokens", 10, "--session", "tiny")
    assert code == 2 and "less than one redistillation step" in one_error_line(err)
    assert not home.exists()  # neither the session nor a job
    code, _, err = call(capsys, *base, "--tokens", 48, "--session", "../escape")
    assert code == 2 and "invalid session name" in one_error_line(err) and not (tmp_path / "escape").exists()
    code, _, err = call(capsys, *base, "--tokens", 48)
    assert code == 2 and "--out is needed" in one_error_line(err)


def test_compress_with_session_runs_as_a_job_of_the_session_and_prints_its_record(capsys, env, tmp_path):
    """The CLI follows the detached job to its end; the model lands in the session's exports/ by default."""
    home = tmp_path / "home"
    small = {**OPTIONS, "calib_tokens": 480, "recon_tokens": 360}
    flags = [x for k, v in small.items() for x in (f"--{k.replace('_', '-')}", v)]
    code, stdout, err = call(capsys, "compress", env / "teacher", "--target-params", 0.8, "--data", env / "data.txt",
                             "--eval-data", env / "data.txt", "--tokens", 48, *flags, "--session", "tiny",
                             "--home", home, "--json")
    assert code == 0, err
    record = json.loads(stdout)
    [export] = list((home / "sessions" / "tiny" / "exports").iterdir())
    assert json.loads((export / "pipeline.json").read_text()) == record and model_files(export)
    [job] = [p for p in (home / "sessions" / "tiny" / "jobs").iterdir() if p.name.startswith("compress-")]
    assert job_status(JobDir(job)).state == "done" and record["prelude"]["work"] == str(job)
    assert f"workbench jobs resume {job.name}" in err  # said at the start, in case the terminal goes
