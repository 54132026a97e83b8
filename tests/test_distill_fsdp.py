"""FSDP2 distillation on CPU with gloo: 2 sharded ranks give the loss curve of 1 process, of a 1-rank FSDP run and
of 2-process DDP; a 2-rank FSDP job killed with SIGKILL and resumed ends bit-identical to the uninterrupted run;
its checkpoints are sharded safetensors (no pickles); a world size that cannot split the batch or differs from the
checkpoint's is refused in one line, exit 2, nothing written; only rank 0 reads weights: every rank's shards and
buffers equal the slices of the model loaded whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from surgery.jobs.runner import start_job, wait_for
from surgery.jobs.status import job_status
from surgery.jobs.store import list_jobs
from surgery.jobs.worker import run_job
from cli_helpers import call, one_error_line
from test_jobs import (  # noqa: F401 - fixtures
    assert_same_weights, env, events_of, kill_after_first_checkpoint, new_job, one_thread, output_tensors,
)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available in this torch build")

# kl + ce + hidden-cos: logits and every block of the non-uniformly pruned student (uneven shards) get gradients
LOSSES = {"kl": 1.0, "ce": 0.1, "hidden-cos": 0.5}


def torchrun(job, nproc: int = 2) -> None:
    """Run a job directory under torch.distributed.run in the foreground, as a user would by hand."""
    env_vars = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "surgery.jobs", "run", str(job.path)],
        capture_output=True, text=True, timeout=300, env=env_vars,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def curve(job) -> list[float]:
    return [e["losses"]["total"] for e in events_of(job) if e["event"] == "step"]


def run_detached(job, nproc: int = 2, resume: bool = False) -> None:
    """Start a job through the runner (torch.distributed.run, own session) and wait for it to finish."""
    proc = start_job(job, nproc=nproc, resume=resume)
    state = wait_for(job, 300)
    proc.wait()
    assert state == "done", job.stderr_file.read_text()[-3000:]


def test_fsdp_matches_one_process_and_ddp_and_resumes_bit_identically_after_sigkill(capsys, tmp_path, env):
    """One test, so that the uninterrupted 2-rank FSDP run is both the loss curve compared with 1 process and
    the reference of the SIGKILL + resume run (each torchrun launch costs seconds on a busy machine)."""
    from surgery.loading import load_model

    over = dict(steps=10, batch_size=4, checkpoint_every=2, losses=LOSSES, max_grad_norm=0.5)
    plain = new_job(tmp_path / "plain", env, **over)
    assert run_job(plain.path) == 0
    one_rank = new_job(tmp_path / "fsdp1", env, fsdp=True, **over)  # no torchrun: a 1-rank FSDP run
    assert run_job(one_rank.path) == 0
    two_ranks = new_job(tmp_path / "fsdp2", env, fsdp=True, **over)
    run_detached(two_ranks)
    ddp = new_job(tmp_path / "ddp2", env, **over)
    torchrun(ddp)

    # the same loss curve, gradient norms (clipped: sharded clipping = unsharded) and weights
    reference = curve(plain)
    assert len(reference) == 10 and reference[0] != reference[-1]
    for job in (one_rank, two_ranks, ddp):
        assert curve(job) == pytest.approx(reference, rel=1e-4), job.path
    assert next(e for e in events_of(two_ranks) if e["event"] == "start")["world_size"] == 2
    norms = lambda job: [e["grad_norm"] for e in events_of(job) if e["event"] == "step"]  # noqa: E731
    assert norms(two_ranks) == pytest.approx(norms(plain), rel=1e-4) and max(norms(plain)) > 0.5
    want = output_tensors(plain.default_output)
    for job in (one_rank, two_ranks):
        got = output_tensors(job.default_output)  # a full, unsharded safetensors model written by rank 0
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    config = json.loads((two_ranks.default_output / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "surgery_layers" in config
    assert load_model(str(two_ranks.default_output)).model.config.vocab_size == 128

    # SIGKILL after the first sharded checkpoint
    job = new_job(tmp_path / "b", env, fsdp=True, **over)
    kill_after_first_checkpoint(job, nproc=2, timeout=300)  # SIGKILL to torchrun: its ranks die with it
    status = job_status(job)
    assert status.state == "lost" and 2 <= status.step < 10, status
    ckpt = sorted(p for p in job.checkpoints_dir.iterdir() if not p.name.startswith("."))[-1]
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert len([f for f in files if f.startswith("shards/")]) == 2, files  # one shard file per rank
    assert all(f.endswith((".safetensors", ".json")) for f in files), files  # no pickles (no DCP .metadata)
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2

    # another world size, or one that cannot split the batch: one line, exit 2, nothing launched or written
    jobs_dir = tmp_path / "b" / "jobs"
    before = job.events_file.read_bytes()
    for flags, expected in ((["--nproc", "1"], "--nproc 2"), (["--foreground"], "--nproc 2"),
                            (["--nproc", "3"], "multiple of grad_accum x processes")):
        code, _, err = call(capsys, "jobs", "resume", job.id, *flags, "--jobs-dir", jobs_dir)
        assert code == 2 and expected in one_error_line(err), err
    assert job.events_file.read_bytes() == before

    run_detached(job, resume=True)
    starts = [e for e in events_of(job) if e["event"] == "start"]
    assert starts[-1]["resumed_from"] is not None and starts[-1]["step"] >= 2
    assert_same_weights(two_ranks.default_output, job.default_output)


def test_a_world_size_that_cannot_split_the_batch_is_refused_before_a_job_exists(capsys, tmp_path, env):
    code, _, err = call(capsys, "distill", "--teacher", env / "teacher", "--student", env / "student",
                        "--data", env / "data.txt", "--steps", 2, "--seq-len", 24, "--batch-size", 4,
                        "--nproc", 3, "--fsdp", "--device", "cpu", "--jobs-dir", tmp_path / "jobs")
    assert code == 2 and "multiple of grad_accum x processes (1 x 3)" in one_error_line(err)
    assert list_jobs(tmp_path / "jobs") == []


def test_a_rank_that_cannot_write_its_shards_leaves_the_previous_checkpoint_the_newest(tmp_path):
    import errno

    from surgery.distill.world import init_world
    from surgery.jobs import checkpoint as ckpt

    def write(tmp):
        (tmp / "rank-0.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    world = init_world("cpu", fsdp=True)  # a process group of one rank
    try:
        first = ckpt.save_sharded_checkpoint(tmp_path, 2, {"world_size": 1, "sharded": "fsdp"}, world,
                                             lambda tmp: (tmp / "marker.json").write_text("{}"))
        with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
            ckpt.save_sharded_checkpoint(tmp_path, 4, {"world_size": 1, "sharded": "fsdp"}, world, write)
    finally:
        world.close()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary directory left behind
    with pytest.raises(ckpt.CheckpointError, match="incomplete sharded checkpoint"):
        ckpt.latest_checkpoint(tmp_path)  # the marker-only checkpoint has no shards: refused, not half-read


def _sharded_view(rank: int, store: str, job_file: str, out: str) -> None:
    """One rank of a 2-rank gloo group (torch.multiprocessing.spawn): prepare + Trainer as a job does, counting
    every whole-model load; writes its local shards and buffers to out/rank-R.safetensors, what it saw to .json."""
    from safetensors.torch import save_file

    import surgery.loading as loading
    from surgery.distill.config import load_config
    from surgery.distill.loop import Trainer
    from surgery.distill.prepare import prepare
    from surgery.distill.world import World

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    reads, load_model = [], loading.load_model

    def counting_load(source, **kw):
        reads.append(os.path.basename(str(source)))
        return load_model(source, **kw)

    loading.load_model = counting_load
    try:
        cfg = load_config(job_file)
        world = World(rank, 2, rank, torch.device("cpu"), distributed=True)
        prep = prepare(cfg, world)
        skeletons = all(p.is_meta for m in (prep.student, prep.teacher) for p in m.parameters())
        trainer = Trainer(cfg, prep, world)
        tensors = {}
        for role, model in (("student", trainer.student), ("teacher", trainer.teacher)):
            for name, p in model.named_parameters():
                tensors[f"{role}.param.{name}"] = p.to_local().detach().clone()
            for name, b in model.named_buffers():
                tensors[f"{role}.buffer.{name}"] = b.detach().clone()
        save_file(tensors, os.path.join(out, f"rank-{rank}.safetensors"))
        with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
            json.dump({"reads": reads, "skeletons": skeletons, "fingerprints": prep.fingerprints}, f)
    finally:
        dist.destroy_process_group()


def test_only_rank_0_reads_weights_and_every_rank_gets_the_slices_and_buffers_of_the_whole_model(tmp_path, env):
    """Each rank builds the models on the meta device; rank 0 alone loads them (once each) and broadcasts: every
    rank's local shards are exactly its torch.chunk of the whole model's parameters, and every buffer (rotary
    inv_freq, which is in no state dict; the pruned layers' placeholders, which are) equals the loaded model's."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from surgery.loading import load_model

    from surgery.apply import apply_plan
    from surgery.export import save_model_dir
    from surgery.plan import parse_plan
    from test_jobs import char_tokenizer
    from tiny_models import make_model

    # a student with a dropped MLP and a low-rank matrix: their zero-length placeholders are persistent buffers
    plan = parse_plan({"version": 1, "steps": [{"op": "drop_mlp", "layer": 0}, {"op": "prune_heads", "layer": 1,
                       "heads": [1, 3]}, {"op": "low_rank", "module": "model.layers.1.mlp.down_proj", "rank": 7}]})
    save_model_dir(apply_plan(make_model("llama", seed=0), plan)[0], tmp_path / "student", tokenizer=char_tokenizer())
    job = new_job(tmp_path, env, fsdp=True, steps=2, student=str(tmp_path / "student"))
    # fork: the ranks start with torch and transformers imported (spawn re-imports them: 108 s against 7 s here)
    mp.start_processes(_sharded_view, args=(str(tmp_path / "store"), str(job.job_file), str(tmp_path)), nprocs=2,
                       start_method="fork")
    seen = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    # the weights are hashed on rank 0 only (every byte read) and the fingerprints sent to rank 1
    from surgery.fingerprint import weights_fingerprint

    fingerprints = {"student": weights_fingerprint(tmp_path / "student"),
                    "teacher": weights_fingerprint(env / "teacher")}
    assert [view.pop("fingerprints") for view in seen] == [fingerprints, fingerprints]
    assert seen[0] == {"reads": ["student", "teacher"], "skeletons": True}
    assert seen[1] == {"reads": [], "skeletons": True}  # rank 1 never held a whole model
    whole = {"student": load_model(str(tmp_path / "student")).model, "teacher": load_model(str(env / "teacher")).model}
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"rank-{rank}.safetensors"))
        want = {}
        for role, model in whole.items():
            for name, p in model.named_parameters():
                want[f"{role}.param.{name}"] = p.detach().chunk(2, dim=0)[rank]
            for name, b in model.named_buffers():
                want[f"{role}.buffer.{name}"] = b
        assert set(got) == set(want)
        assert any(".inv_freq" in k for k in want) and any(v.numel() == 0 for v in want.values())
        for name in want:
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), (rank, name)
