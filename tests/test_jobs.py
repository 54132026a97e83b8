"""Distillation jobs end to end on tiny models: foreground runs, SIGKILL + resume determinism, lost detection,
cancel, crashes, bad input (exit 2, nothing lost), a full disk while checkpointing, and DDP on CPU with gloo."""

from __future__ import annotations

import errno
import json
import os
import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.apply import apply_plan
from surgery.export import save_model_dir
from surgery.jobs import checkpoint as ckpt
from surgery.jobs.events import read_events
from surgery.jobs.runner import request_cancel, request_checkpoint, start_job
from surgery.jobs.status import job_status
from surgery.processes import pid_alive
from surgery.jobs.store import JobDir, create_job, list_jobs
from surgery.jobs.worker import run_job
from surgery.plan import parse_plan
from cli_helpers import call, one_error_line
from tiny_models import make_config, make_model

SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def char_tokenizer():
    """A character-level tokenizer whose ids (< 103) fit the tiny models' vocabulary of 128."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models are all per-op overhead: one thread avoids OpenMP barriers on a busy 2-core machine (a 100x
    slowdown measured here), for this process and for the job processes the tests start."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Teacher (tiny llama), student = the teacher pruned non-uniformly (a surgery-only checkpoint), a narrow
    student with another vocabulary size, and ~12k characters of text."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("distill")
    tok = char_tokenizer()
    teacher = make_model("llama", seed=0)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    plan = parse_plan({"version": 1, "steps": [{"op": "prune_neurons", "layer": 1, "neurons": list(range(40))},
                                               {"op": "prune_heads", "layer": 0, "heads": [1, 3]}]})
    student, _ = apply_plan(make_model("llama", seed=0), plan)
    save_model_dir(student, root / "student", tokenizer=tok)
    cfg = make_config("llama")
    cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers = 110, 32, 2
    torch.manual_seed(3)
    narrow = AutoModelForCausalLM.from_config(cfg)
    narrow.save_pretrained(root / "narrow")
    tok.save_pretrained(root / "narrow")
    text = SHAKESPEARE.read_text()[:12000] if SHAKESPEARE.is_file() else " ".join(
        f"word{i % 97} and line {i}." for i in range(1500))
    (root / "data.txt").write_text(text)
    return root


def job_doc(env, **over) -> dict:
    doc = {"version": 1, "teacher": str(env / "teacher"), "student": str(env / "student"),
           "data": str(env / "data.txt"), "losses": {"kl": 1.0, "ce": 0.1, "hidden-cos": 0.5}, "temperature": 2.0,
           "steps": 6, "seq_len": 24, "batch_size": 4, "lr": 3e-3, "checkpoint_every": 3, "seed": 7,
           "device": "cpu"}
    doc.update(over)
    return doc


def new_job(tmp_path, env, **over) -> JobDir:
    return create_job(tmp_path / "jobs", json.dumps(job_doc(env, **over)))


def events_of(job: JobDir) -> list[dict]:
    return read_events(job.events_file)[0]


def output_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(Path(path).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_same_weights(want_dir: Path, got_dir: Path) -> None:
    """Two output models hold the same tensor names and bit-identical values (the resume promise)."""
    want, got = output_tensors(want_dir), output_tensors(got_dir)
    assert set(want) == set(got)
    for name in want:
        assert torch.equal(want[name], got[name]), name


def wait_until(predicate, timeout=120.0, poll=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("timed out waiting")


def kill_after_first_checkpoint(job: JobDir, nproc: int = 1, timeout: float = 120.0) -> None:
    """Start `job` detached and SIGKILL its process group as soon as its first checkpoint event is written."""
    proc = start_job(job, nproc=nproc)
    try:
        wait_until(lambda: any(e["event"] == "checkpoint" for e in events_of(job)), timeout=timeout)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------- happy path through the CLI


def test_distill_foreground_logs_each_term_and_writes_a_loadable_model(capsys, tmp_path, env):
    from surgery.loading import load_model

    out_dir = tmp_path / "redistilled"
    code, out, err = call(capsys, "distill", "--teacher", env / "teacher", "--student", env / "student",
                          "--data", env / "data.txt", "--loss", "kl:1.0,ce:0.1,hidden-cos:0.5,hidden-l2:0.01",
                          "--temperature", 2, "--steps", 4, "--seq-len", 24, "--batch-size", 4, "--lr", 3e-3,
                          "--eval-data", env / "data.txt", "--eval-tokens", 480, "--out", out_dir,
                          "--jobs-dir", tmp_path / "jobs", "--device", "cpu", "--foreground")
    assert code == 0, err
    (job,) = list_jobs(tmp_path / "jobs")
    events = events_of(job)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    for e in steps:
        assert set(e["losses"]) == {"kl", "ce", "hidden-cos", "hidden-l2", "total"}
        assert e["lr"] == pytest.approx(3e-3) and e["tokens_per_s"] > 0 and "eta_s" in e
        weighted = e["losses"]["kl"] + 0.1 * e["losses"]["ce"] + 0.5 * e["losses"]["hidden-cos"] \
            + 0.01 * e["losses"]["hidden-l2"]
        assert e["losses"]["total"] == pytest.approx(weighted, rel=1e-6)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 4] and evals[0]["perplexity"] > 1
    assert events[-1]["event"] == "done" and events[-1]["output"] == str(out_dir)
    assert job_status(job).state == "done"

    manifest = json.loads((out_dir / "surgery.json").read_text())
    assert manifest["job"] == job.id and manifest["data"]["tokens"] > 0
    assert manifest["eval"]["before"]["perplexity"] == pytest.approx(evals[0]["perplexity"])
    loaded = load_model(str(out_dir))  # a surgery-only student stays loadable with surgery.load
    before = output_tensors(env / "student")
    after = output_tensors(out_dir)
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)
    assert loaded.model.config.vocab_size == 128

    code, out, _ = call(capsys, "jobs", "list", "--jobs-dir", tmp_path / "jobs", "--json")
    assert code == 0 and json.loads(out)[0]["state"] == "done"
    code, out, _ = call(capsys, "jobs", "show", job.id[:-2], "--jobs-dir", tmp_path / "jobs")
    assert code == 0 and "done" in out and str(out_dir) in out
    code, out, _ = call(capsys, "jobs", "logs", job.id, "--jobs-dir", tmp_path / "jobs")
    assert code == 0 and "step 4/4" in out and "perplexity" in out and "done at step 4" in out
    code, out, _ = call(capsys, "jobs", "logs", job.id, "--follow", "--json", "--jobs-dir", tmp_path / "jobs")
    assert code == 0 and [json.loads(line)["event"] for line in out.splitlines()][-1] == "done"


# ---------------------------------------------------------------- kill -9, lost, resume determinism


def test_sigkill_then_resume_gives_the_uninterrupted_weights(capsys, tmp_path, env):
    over = dict(steps=120, checkpoint_every=4, batch_size=4, grad_accum=2)
    reference = new_job(tmp_path / "a", env, **over)
    assert run_job(reference.path) == 0

    job = new_job(tmp_path / "b", env, **over)
    proc = start_job(job)
    try:
        wait_until(lambda: any(e["event"] == "checkpoint" for e in events_of(job)))
        assert job_status(job).state == "running"
        # a second start of a running job is refused with one line, exit 2, and changes nothing
        before = job.events_file.read_bytes()
        code, _, err = call(capsys, "jobs", "resume", job.id, "--jobs-dir", tmp_path / "b" / "jobs")
        assert code == 2 and "already running" in one_error_line(err)
        assert job.events_file.read_bytes()[: len(before)] == before
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    status = job_status(job)
    assert status.state == "lost" and 4 <= status.step < 120, status
    assert events_of(job)[-1]["event"] not in ("done", "failed", "cancelled")
    code, out, _ = call(capsys, "jobs", "show", job.id, "--jobs-dir", tmp_path / "b" / "jobs")
    assert code == 0 and "lost" in out and "running" not in out

    code, _, err = call(capsys, "jobs", "resume", job.id, "--foreground", "--jobs-dir", tmp_path / "b" / "jobs")
    assert code == 0, err
    starts = [e for e in events_of(job) if e["event"] == "start"]
    assert starts[-1]["resumed_from"] is not None and starts[-1]["step"] >= 4
    assert_same_weights(reference.default_output, job.default_output)


# ---------------------------------------------------------------- cancel, crash, lost


def test_checkpoint_now_and_cancel(tmp_path, env):
    job = new_job(tmp_path, env, steps=500, checkpoint_every=1000)
    codes = []
    thread = threading.Thread(target=lambda: codes.append(run_job(job.path)))
    thread.start()
    try:
        wait_until(lambda: any(e["event"] == "step" for e in events_of(job)))
        assert job_status(job).state == "running"
        assert "checkpoint requested" in request_checkpoint(job)  # "checkpoint now", between two steps
        wait_until(lambda: any(e["event"] == "checkpoint" for e in events_of(job)))
        assert not job.checkpoint_request_file.exists()
        assert "cancel requested" in request_cancel(job)
    finally:
        job.cancel_file.write_text("{}")
        thread.join(120)
    assert codes == [0]
    final = events_of(job)[-1]
    assert final["event"] == "cancelled" and 1 <= final["step"] < 500
    assert final["checkpoint"] == ckpt.checkpoint_name(final["step"])
    assert job_status(job).state == "cancelled"
    _, state = ckpt.load_checkpoint(job.checkpoints_dir / final["checkpoint"])
    assert state["step"] == final["step"]


def test_foreground_resume_ignores_a_stale_cancel_request(capsys, tmp_path, env):
    """A cancel file left from an earlier attempt must not stop the resumed one (the detached path clears it too)."""
    job = new_job(tmp_path, env, steps=4, checkpoint_every=2)
    job.cancel_file.write_text("{}")  # cancelled at its first step, after a checkpoint
    assert run_job(job.path) == 0 and job_status(job).state == "cancelled"
    job.cancel_file.write_text("{}")  # stale: nobody asked this attempt to stop
    code, _, err = call(capsys, "jobs", "resume", job.id, "--foreground", "--jobs-dir", tmp_path / "jobs")
    assert code == 0, err
    assert job_status(job).state == "done" and events_of(job)[-1]["event"] == "done"
    code, _, err = call(capsys, "jobs", "resume", job.id, "--foreground", "--jobs-dir", tmp_path / "jobs")
    assert code == 2 and "is done" in one_error_line(err)


def test_sigterm_to_a_detached_job_cancels_it_cleanly(tmp_path, env):
    job = new_job(tmp_path, env, steps=2000, checkpoint_every=1000)
    proc = start_job(job)
    try:
        wait_until(lambda: any(e["event"] == "step" for e in events_of(job)))
        os.killpg(proc.pid, signal.SIGTERM)  # what `kill`, systemd or a scheduler sends
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    final = events_of(job)[-1]
    assert final["event"] == "cancelled" and final["checkpoint"] == ckpt.checkpoint_name(final["step"])
    assert job_status(job).state == "cancelled"


def test_a_crash_writes_a_failed_event_with_the_error(capsys, tmp_path, env, monkeypatch):
    from surgery.distill import loop

    real_step = loop.Trainer.step

    def exploding(self, step):
        if step == 2:
            raise RuntimeError("boom in step 2")
        return real_step(self, step)

    monkeypatch.setattr(loop.Trainer, "step", exploding)
    job = new_job(tmp_path, env)
    assert run_job(job.path) == 1
    final = events_of(job)[-1]
    assert final["event"] == "failed" and final["step"] == 2
    assert "boom in step 2" in final["error"] and "RuntimeError" in final["traceback"]
    status = job_status(job)
    assert status.state == "failed" and "boom" in status.error
    code, _, err = call(capsys, "jobs", "cancel", job.id, "--jobs-dir", tmp_path / "jobs")
    assert code == 2 and "not running (it is failed)" in one_error_line(err)


def test_bad_input_found_in_the_job_process_fails_with_exit_2(tmp_path, env):
    job = new_job(tmp_path, env, eval_data=str(tmp_path / "gone.txt"))
    assert run_job(job.path) == 2
    final = events_of(job)[-1]
    assert final["event"] == "failed" and "gone.txt" in final["error"]


def test_a_vanished_process_is_lost_never_running(tmp_path, env):
    job = new_job(tmp_path, env)
    assert job_status(job).state == "created"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits but is not reaped: still has a pid
    wait_until(lambda: not pid_alive(zombie.pid))
    for pid in (dead.pid, zombie.pid):
        job.process_file.write_text(json.dumps({"pid": pid}))
        job.events_file.write_text(json.dumps({"event": "start", "step": 3, "time": 0}) + "\n")
        status = job_status(job)
        assert status.state == "lost" and status.step == 3
    zombie.wait()


# ---------------------------------------------------------------- bad input at the CLI: exit 2, nothing created


def test_different_vocabularies_refuse_logit_losses(capsys, tmp_path, env):
    base = ["distill", "--teacher", env / "teacher", "--student", env / "narrow", "--data", env / "data.txt",
            "--steps", 2, "--jobs-dir", tmp_path / "jobs", "--device", "cpu", "--foreground"]
    code, _, err = call(capsys, *base, "--loss", "kl:1,hidden-cos:1")
    assert code == 2 and "different vocabularies" in one_error_line(err)
    code, _, err = call(capsys, *base, "--loss", "hidden-cos:1", "--no-projection")
    assert code == 2 and "projection" in one_error_line(err)
    assert list_jobs(tmp_path / "jobs") == []
    # hidden losses through a learned projection (widths 32 -> 64 as well) are allowed and train
    code, _, err = call(capsys, *base, "--loss", "hidden-cos:1,hidden-l2:0.1", "--seq-len", 16,
                        "--batch-size", 2, "--hidden-layers", "0:0,1:2")
    assert code == 0, err
    (job,) = list_jobs(tmp_path / "jobs")
    steps = [e for e in events_of(job) if e["event"] == "step"]
    assert len(steps) == 2 and set(steps[0]["losses"]) == {"hidden-cos", "hidden-l2", "total"}


def test_layer_map_naming_a_missing_layer_is_refused(capsys, tmp_path, env):
    code, _, err = call(capsys, "distill", "--teacher", env / "teacher", "--student", env / "student",
                        "--data", env / "data.txt", "--loss", "hidden-cos:1", "--hidden-layers", "0:1,2:7",
                        "--jobs-dir", tmp_path / "jobs")
    assert code == 2 and "teacher layer 7 but the teacher has 3 layers" in one_error_line(err)
    assert list_jobs(tmp_path / "jobs") == []


def test_job_file_from_a_newer_version_is_refused(tmp_path, env, capsys):
    from surgery.jobs.__main__ import main

    path = tmp_path / "newer.json"
    path.write_text(json.dumps(job_doc(env, version=2, fancy_new_field=True)))
    assert main(["run", str(path), "--jobs-dir", str(tmp_path / "jobs")]) == 2
    assert "newer than this workbench" in capsys.readouterr().err
    assert list_jobs(tmp_path / "jobs") == []


def test_unknown_loss_and_bad_batch_split(capsys, tmp_path, env):
    base = ["distill", "--teacher", env / "teacher", "--student", env / "student", "--data", env / "data.txt",
            "--jobs-dir", tmp_path / "jobs"]
    code, _, err = call(capsys, *base, "--loss", "kl:1,mse:2")
    assert code == 2 and "unknown loss 'mse'" in one_error_line(err)
    code, _, err = call(capsys, *base, "--batch-size", 3, "--grad-accum", 2)
    assert code == 2 and "multiple of grad_accum" in one_error_line(err)


# ---------------------------------------------------------------- checkpoints: atomic, full disk


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    tensors = {"student.w": torch.arange(6.0).view(2, 3), "rng.cpu": torch.get_rng_state()}
    first = ckpt.save_checkpoint(tmp_path, 5, tensors, {"note": "first"})
    real = safetensors.torch.save_file

    def disk_full(data, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        ckpt.save_checkpoint(tmp_path, 10, {k: v + 1 for k, v in tensors.items()}, {"note": "second"})
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert ckpt.list_checkpoints(tmp_path) == [first]
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary leftovers
    path, loaded, state = ckpt.latest_checkpoint(tmp_path)
    assert path == first and state["step"] == 5 and state["note"] == "first"
    assert torch.equal(loaded["student.w"], tensors["student.w"])


def test_checkpoints_hold_no_pickles_and_keep_the_newest(tmp_path):
    t = {"student.w": torch.ones(2), "optim.0.exp_avg": torch.zeros(2)}
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, t, {}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
    files = sorted(p.name for p in (tmp_path / "step-00000006").iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "state.json"]


# ---------------------------------------------------------------- DDP on CPU


def test_two_gloo_processes_give_the_single_process_loss_curve(tmp_path, env):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    over = dict(steps=3, batch_size=4, grad_accum=1, checkpoint_every=100, losses={"kl": 1.0, "ce": 0.1})
    single = new_job(tmp_path / "one", env, **over)
    assert run_job(single.path) == 0
    double = new_job(tmp_path / "two", env, **over)
    env_vars = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "surgery.jobs", "run", str(double.path)],
        capture_output=True, text=True, timeout=300, env=env_vars,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    curve = lambda job: [e["losses"]["total"] for e in events_of(job) if e["event"] == "step"]  # noqa: E731
    one, two = curve(single), curve(double)
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-4)
    assert next(e for e in events_of(double) if e["event"] == "start")["world_size"] == 2
    a, b = output_tensors(single.default_output), output_tensors(double.default_output)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the pipeline in a plan


def test_pipeline_distill_prune_redistill_is_replayable_byte_for_byte(capsys, tmp_path, env, monkeypatch):
    doc = {
        "version": 1, "kind": "pipeline", "model": {"source": str(env / "teacher")}, "seed": 3,
        "defaults": {"data": str(env / "data.txt"), "seq_len": 24, "batch_size": 2, "steps": 3, "lr": 3e-3,
                     "device": "cpu"},
        "eval": {"data": str(env / "data.txt"), "tokens": 240, "seq_len": 24},
        "stages": [
            {"stage": "distill", "student": {"layers": [0, 2]}, "job": {"losses": {"kl": 1.0, "hidden-cos": 0.5}}},
            {"stage": "prune", "steps": [{"op": "prune_heads", "layer": 0, "heads": [1, 3]}]},
            {"stage": "redistill", "job": {"losses": {"kl": 1.0, "ce": 0.1}}},
        ],
    }
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(doc))
    outs = []
    for name in ("first", "second"):
        # the second run goes through `workbench apply`, which routes pipeline files (jobs root from the env)
        argv = (["jobs", "pipeline", path, "--jobs-dir", tmp_path / "jobs"] if name == "first"
                else ["apply", path])
        monkeypatch.setenv("WORKBENCH_JOBS", str(tmp_path / "jobs"))
        code, _, err = call(capsys, *argv, "--out", tmp_path / name, "--json")
        assert code == 0, err
        outs.append(tmp_path / name)
    record = json.loads((outs[0] / "pipeline.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["distill", "prune", "redistill"]
    assert record["stages"][0]["data"]["fingerprint"].startswith("sha256:")
    before, after = record["metrics"]["before"], record["metrics"]["after"]
    assert after["params"] < before["params"] and after["perplexity"] > 1
    assert json.loads((outs[0] / "config.json").read_text())["num_hidden_layers"] == 2
    weights = [sorted(p.name for p in o.glob("*.safetensors")) for o in outs]
    assert weights[0] and weights[0] == weights[1]
    for name in weights[0]:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    assert len(list_jobs(tmp_path / "jobs")) == 4  # two training stages per run


def test_bad_pipeline_is_refused_before_anything_runs(capsys, tmp_path, env):
    doc = {"version": 1, "kind": "pipeline", "model": {"source": str(env / "teacher")},
           "defaults": {"data": str(env / "data.txt")},
           "stages": [{"stage": "redistill", "job": {"steps": 0}}]}
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(doc))
    code, _, err = call(capsys, "jobs", "pipeline", path, "--out", tmp_path / "out", "--jobs-dir", tmp_path / "j")
    assert code == 2 and "steps" in one_error_line(err)
    path.write_text(json.dumps({**doc, "version": 9}))
    code, _, err = call(capsys, "jobs", "pipeline", path, "--out", tmp_path / "out", "--jobs-dir", tmp_path / "j")
    assert code == 2 and "newer than this workbench" in one_error_line(err)
    assert not (tmp_path / "out").exists() and list_jobs(tmp_path / "j") == []


def test_relative_paths_in_a_loose_job_file_are_resolved_against_the_file(env):
    from surgery.distill.config import parse_config

    cfg = parse_config(job_doc(env, teacher="teacher", student="smollm2-135m", data="./data.txt"))
    fixed = cfg.with_paths_from(env)
    assert fixed.teacher == str(env / "teacher") and fixed.data == str(env / "data.txt")
    assert fixed.student == "smollm2-135m"  # an alias stays an alias


def test_a_diverging_job_fails_at_its_step_and_never_writes_a_model(tmp_path, env):
    # a finite but absurd learning rate: the weights overflow within a few steps (issue 15 item 6)
    job = new_job(tmp_path, env, lr=1e30, losses={"kl": 1.0}, checkpoint_every=100)
    assert run_job(job.path) == 2
    final = events_of(job)[-1]
    assert final["event"] == "failed" and "training diverged at step" in final["error"], final
    assert f"step {final['step'] + 1}:" in final["error"]  # the step that went wrong, after the last good one
    assert not any(e["event"] == "done" for e in events_of(job))
    assert not job.default_output.exists()
    assert job_status(job).state == "failed"


@pytest.mark.parametrize("flags, expected", [
    (["--loss", "kl:inf"], "finite"), (["--loss", "kl:1e400"], "finite"), (["--temperature", "inf"], "finite"),
    (["--loss", "kl:1,kl:2"], "kl twice"),
])
def test_non_finite_or_repeated_distill_settings_are_refused(capsys, tmp_path, env, flags, expected):
    code, _, err = call(capsys, "distill", "--teacher", env / "teacher", "--student", env / "student",
                        "--data", env / "data.txt", "--steps", 2, "--jobs-dir", tmp_path / "jobs", "--device", "cpu",
                        "--foreground", *flags)
    assert code == 2, err
    assert expected in one_error_line(err)
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())
