"""The body of a job process: load, resume from the last checkpoint, train, checkpoint, evaluate, save.

Rank 0 (the only rank in a single-process job) owns the job directory: it holds the lock, refreshes the heartbeat,
appends events and writes checkpoints and the output. Every rank polls the same stop condition (a `cancel` file in
the job directory, or SIGTERM) and the ranks agree on it before each step, so they stop at the same step.

Whatever ends the run, the log gets a final event: `done`, `cancelled` (after a checkpoint, so `resume` continues
from exactly that step) or `failed` with the error. Only a process killed outright (SIGKILL, power loss) leaves no
final event; `surgery.jobs.status` then reports the job as lost.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from pathlib import Path

from surgery.errors import UserError
from surgery.jobs.events import EventLog, last_final, read_events
from surgery.jobs.store import JobDir

HEARTBEAT_S = 2.0


def _heartbeat(job: JobDir, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            job.heartbeat_file.touch()
        except OSError:
            pass
        stop.wait(HEARTBEAT_S)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines and not isinstance(exc, UserError) else (
        lines[0] if lines else type(exc).__name__)


def _manifest(job: JobDir, cfg, prep, events: list[dict], after: dict | None) -> dict:
    from surgery.pipeline import versions

    before = next((e for e in events if e["event"] == "eval" and e.get("step") == 0), None)
    strip = ("event", "time")
    return {
        "version": 1,
        "kind": "distill",
        "job": job.id,
        "teacher": {"source": cfg.teacher, "fingerprint": prep.fingerprints["teacher"]},
        "student": {"source": cfg.student, "fingerprint": prep.fingerprints["student"]},
        "data": prep.train.describe(),
        "eval": None if prep.eval is None else {
            "data": prep.eval.describe(),
            "before": {k: v for k, v in before.items() if k not in strip} if before else None,
            "after": after,
        },
        "losses": {n: w for n, w in cfg.losses.items() if w > 0},
        "teacher_cache": None if prep.cache is None else {"dir": cfg.teacher_cache, **prep.cache.manifest["key"],
                                                          "bytes_per_token": prep.cache.manifest["bytes_per_token"]},
        "steps": cfg.steps,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "job_file": cfg.model_dump(mode="json"),
        "versions": versions(),
    }


def _output_owned_by(out: Path, job_id: str) -> bool:
    """Whether `out` holds an output this job wrote before (a crash between saving and the done event)."""
    import json

    try:
        return json.loads((out / "surgery.json").read_text()).get("job") == job_id
    except (OSError, ValueError):
        return False


def run_job(path: str | Path) -> int:
    """Run (or continue) the job in directory `path` in this process; returns the process exit code.

    0: done or cancelled; 2: bad input (the `failed` event says what); 1: a bug (the traceback is in the event).
    """
    import torch

    from surgery.distill.config import load_config
    from surgery.distill.loop import LoopHooks, Trainer, set_determinism, train
    from surgery.distill.prepare import prepare
    from surgery.distill.world import init_world
    from surgery.jobs.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint, save_sharded_checkpoint
    from surgery.jobs.runner import LOCK_FD_ENV, acquire_lock, write_process_record

    job = JobDir(Path(path).resolve())
    log = EventLog(job.events_file)
    lock_fd = None
    if os.environ.get("RANK", "0") == "0" and LOCK_FD_ENV not in os.environ:
        # launched directly (foreground, or torchrun by hand): take the lock here; a running job raises
        # JobRunning before anything is written
        lock_fd = acquire_lock(job)
        if (last_final(read_events(job.events_file)[0]) or {}).get("event") == "done":
            os.close(lock_fd)
            raise UserError(f"job {job.id} is done: nothing to run (start a new job instead)")
        write_process_record(job, os.getpid(), command="foreground", attempt=None)
        log.append("launch", pid=os.getpid(), attempt=None, nproc=int(os.environ.get("WORLD_SIZE", "1")),
                   resume=False)
    world, stop_beat, stop_request = None, threading.Event(), threading.Event()
    old_handler = None
    step_done = 0
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        cfg = load_config(job.job_file)
        world = init_world(cfg.device, fsdp=cfg.fsdp)
        if world.is_main:
            threading.Thread(target=_heartbeat, args=(job, stop_beat), daemon=True).start()
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGTERM, lambda *_: stop_request.set())

        def say(message: str) -> None:
            if world.is_main:
                log.append("status", message=message)

        set_determinism(cfg.seed, cfg.deterministic)
        prep = prepare(cfg, world, progress=say)
        trainer = Trainer(cfg, prep, world)
        start, resumed_from = 0, None
        found = latest_checkpoint(job.checkpoints_dir)
        if found is not None:
            ckpt_path, tensors, meta = found
            start, resumed_from = trainer.load_state(tensors, meta), ckpt_path.name
        step_done = start
        if world.is_main:
            cache = None if prep.cache is None else {
                "dir": cfg.teacher_cache, "bytes_per_token": prep.cache.manifest["bytes_per_token"],
                "bytes": prep.cache.manifest["bytes"], "key": prep.cache.manifest["key"]}
            log.append("start", step=start, pid=os.getpid(), world_size=world.size, resumed_from=resumed_from,
                       device=str(world.device), train=prep.train.describe(), teacher_cache=cache)
        if start == 0 and prep.eval is not None and trainer.evaluates_here:
            before = trainer.evaluate()
            if world.is_main:
                log.append("eval", step=0, **before)
        world.barrier()

        clock = {"t0": time.perf_counter(), "avg": None}

        def on_step(step: int, result, seconds: float) -> None:
            nonlocal step_done
            step_done = step + 1
            avg = clock["avg"]
            clock["avg"] = seconds if avg is None else 0.8 * avg + 0.2 * seconds
            if world.is_main and (step_done % cfg.log_every == 0 or step_done == cfg.steps):
                extra = {"source": result.source} if cfg.on_policy > 0 or cfg.seq_kd else {}
                log.append("step", step=step_done, losses=result.losses, lr=result.lr, grad_norm=result.grad_norm,
                           **extra,
                           tokens_per_s=round(result.tokens / seconds, 1) if seconds > 0 else None,
                           eta_s=round(clock["avg"] * (cfg.steps - step_done), 1),
                           elapsed_s=round(time.perf_counter() - clock["t0"], 3),
                           epoch=round(step_done * cfg.batch_size / prep.train.num_blocks, 4))

        def checkpoint(n: int) -> str | None:
            if not (world.is_main or trainer.sharded):  # FSDP: every rank writes its shards
                return None
            tensors, meta = trainer.state(n)
            try:
                if trainer.sharded:
                    p = save_sharded_checkpoint(job.checkpoints_dir, n, meta, world, trainer.write_shards,
                                                keep=cfg.keep_checkpoints)
                else:
                    p = save_checkpoint(job.checkpoints_dir, n, tensors, meta, keep=cfg.keep_checkpoints)
            except CheckpointError as exc:
                if world.is_main:
                    log.append("checkpoint_failed", step=n, error=str(exc))
                return None
            if world.is_main:
                log.append("checkpoint", step=n, path=str(p.relative_to(job.path)))
            return p.name

        def after_step(n: int) -> None:
            requested = world.is_main and job.checkpoint_request_file.exists()  # only rank 0 writes checkpoints
            if trainer.sharded:  # ... except under FSDP, where all ranks must agree to write one
                requested = world.any(requested)
            if n < cfg.steps and (n % cfg.checkpoint_every == 0 or requested):
                checkpoint(n)
                if requested:
                    job.checkpoint_request_file.unlink(missing_ok=True)
            if cfg.eval_every and n < cfg.steps and n % cfg.eval_every == 0 and prep.eval is not None:
                if trainer.evaluates_here:
                    result = trainer.evaluate()
                    if world.is_main:
                        log.append("eval", step=n, **result)
                world.barrier()

        def should_stop() -> bool:
            return stop_request.is_set() or job.cancel_file.exists()

        finished = train(trainer, start, LoopHooks(should_stop, on_step, after_step))
        if finished < cfg.steps:
            name = checkpoint(finished) if finished > start or found is None else found[0].name
            if world.is_main:
                log.append("cancelled", sync=True, step=finished, checkpoint=name)
            return 0
        after = trainer.evaluate() if trainer.evaluates_here else None
        if after is not None:
            after = {"step": finished, **after}
        out = Path(cfg.out).expanduser() if cfg.out else job.default_output
        manifest = None
        if world.is_main:
            if after is not None:
                log.append("eval", **after)
            events, _ = read_events(job.events_file)
            manifest = _manifest(job, cfg, prep, events, after)
            say("saving the student")
        from surgery.sources import quiet_progress_bars

        with quiet_progress_bars():  # rank 0 writes; under FSDP every rank first sends its shards to rank 0
            trainer.save_output(out, tokenizer=prep.tokenizer, manifest=manifest,
                                overwrite=cfg.overwrite or _output_owned_by(out, job.id))
        if world.is_main:
            log.append("done", sync=True, step=finished, output=str(out), eval=after)
        world.barrier()
        return 0
    except BaseException as exc:  # noqa: BLE001 - every ending gets a final event
        if world is None or world.is_main:
            log.append("failed", sync=True, step=step_done, error=_one_line(exc), error_type=type(exc).__name__,
                       traceback="".join(traceback.format_exception(exc))[-4000:])
        if isinstance(exc, KeyboardInterrupt):
            return 130
        return 2 if isinstance(exc, UserError) else 1
    finally:
        stop_beat.set()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if not deterministic_before:
            torch.use_deterministic_algorithms(False)
        if world is not None:
            world.close()
        if lock_fd is not None:
            os.close(lock_fd)


def run_new_job(jobs_root: str | Path, job_json: str) -> tuple[JobDir, int, list[dict], float]:
    """Create a job from a job file's text and run it in this process (pipelines, benchmarks).

    Returns:
        (the job directory, exit code as `run_job`, its events, wall seconds).
    """
    from surgery.jobs.store import create_job

    job = create_job(Path(jobs_root), job_json)
    t0 = time.perf_counter()
    code = run_job(job.path)
    wall = time.perf_counter() - t0
    return job, code, read_events(job.events_file)[0], wall

