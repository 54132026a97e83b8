"""`workbench distill` (start a distillation job) and `workbench jobs list|show|logs|cancel|resume`.

A job runs detached (its own session and process group) and survives the terminal; these commands only read its
directory and write requests into it. `--foreground` runs it in this process instead (tests, debugging).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from workbench.cli_common import JsonOpt, err, out, print_json

app = typer.Typer(no_args_is_help=True, help="Background jobs: list, show, logs, checkpoint, cancel, resume; pipeline.")

JobsDirOpt = Annotated[
    Path | None,
    typer.Option("--jobs-dir", help="Jobs root (default: $WORKBENCH_JOBS, else the user data dir's jobs/)."),
]
IdArg = Annotated[str, typer.Argument(help="Job id (a unique prefix is enough) or job directory.")]
NprocOpt = Annotated[int, typer.Option("--nproc", help="Processes (torch.distributed.run: DDP, or FSDP2 with "
                                                        "--fsdp; gloo on CPU; on CUDA one GPU each). Default 1.")]


def _abs_if_path(source: str | None) -> str | None:
    """Make local paths absolute (the job process runs elsewhere); leave aliases and hub ids alone."""
    if source is None:
        return None
    p = Path(source).expanduser()
    return str(p.resolve()) if p.exists() or source.startswith((".", "/", "~")) else source


def distill(
    teacher: Annotated[str, typer.Option("--teacher", help="Teacher model source (frozen).")],
    student: Annotated[str, typer.Option("--student", help="Student model source (trained).")],
    data: Annotated[str, typer.Option("--data", help="Training text: .txt, .jsonl, .parquet or hf:NAME.")],
    loss: Annotated[str, typer.Option("--loss", help="Terms and weights: kl, rkl, jsd, ce, hidden-cos, "
                                                     "hidden-l2, e.g. kl:1.0,ce:0.1,hidden-cos:0.5")] = "kl:1.0",
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the logit losses.")] = 2.0,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 100,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per block.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Blocks per optimizer step (all processes).")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-4,
    schedule: Annotated[str, typer.Option(help="constant, linear, cosine or wsd (peak held, decay over the last 20%).")] = "constant",
    warmup: Annotated[int, typer.Option(help="Warmup steps.")] = 0,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Text for perplexity before/after.")] = None,
    eval_tokens: Annotated[int | None, typer.Option("--eval-tokens", help="Cap on eval tokens.")] = None,
    eval_every: Annotated[int | None, typer.Option("--eval-every", help="Also evaluate every N steps.")] = None,
    eval_seq_len: Annotated[int | None, typer.Option("--eval-seq-len",
                                                     help="Eval block length (default: --seq-len).")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Cap on training tokens.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Keep the teacher's top k logits.")] = None,
    jsd_beta: Annotated[float, typer.Option("--jsd-beta", help="jsd between forward KL (0) and reverse KL (1), "
                                                                "as GKD.")] = 0.5,
    on_policy: Annotated[float, typer.Option("--on-policy", help="Fraction lambda of steps trained on "
                                                                 "continuations the student samples (GKD).")] = 0.0,
    seq_kd: Annotated[bool, typer.Option("--seq-kd", help="Train on the teacher's own sampled continuations "
                                                          "(sequence-level KD; hard labels with ce).")] = False,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", help="Tokens sampled after each prompt "
                                                                 "(on-policy, seq-kd).")] = 64,
    teacher_cache: Annotated[str | None, typer.Option("--teacher-cache", help="Directory of the teacher's top-k "
                                                                              "log-probs: built on first use, read "
                                                                              "afterwards (needs --top-k).")] = None,
    hidden_layers: Annotated[str | None, typer.Option("--hidden-layers",
                                                      help="Student:teacher blocks, e.g. 0:1,1:3,2:5.")] = None,
    projection: Annotated[bool | None, typer.Option("--projection/--no-projection",
                                                    help="Learned width map for hidden losses.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data order and every RNG.")] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")] = 50,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Final model directory "
                                                                     "(default: the job's output/).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")] = False,
    nproc: NprocOpt = 1,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Shard student and teacher with FSDP2 over the processes "
                                                      "(instead of DDP; one process: a 1-rank FSDP run).")] = False,
    jobs_dir: JobsDirOpt = None,
    foreground: Annotated[bool, typer.Option("--foreground", help="Run in this process, not detached.")] = False,
    print_job: Annotated[bool, typer.Option("--print-job", help="Print the job file and start nothing.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Start a distillation job (teacher -> student) in the background; prints its id."""
    from surgery.distill.config import parse_config, parse_layer_map, parse_losses
    from surgery.distill.prepare import check_job
    from surgery.errors import UserError

    doc = {
        "version": 1, "kind": "distill", "teacher": _abs_if_path(teacher), "student": _abs_if_path(student),
        "data": _abs_if_path(data), "eval_data": _abs_if_path(eval_data), "eval_tokens": eval_tokens,
        "eval_every": eval_every, "eval_seq_len": eval_seq_len, "max_tokens": max_tokens, "losses": parse_losses(loss),
        "temperature": temperature, "top_k": top_k, "jsd_beta": jsd_beta, "on_policy": on_policy,
        "seq_kd": seq_kd, "gen_tokens": gen_tokens, "teacher_cache": _abs_if_path(teacher_cache),
        "hidden_layers": parse_layer_map(hidden_layers) if hidden_layers else None, "projection": projection,
        "steps": steps, "seq_len": seq_len, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
        "schedule": schedule, "warmup_steps": warmup, "seed": seed, "checkpoint_every": checkpoint_every,
        "device": device, "out": str(out_dir.expanduser().resolve()) if out_dir else None, "overwrite": overwrite,
        "fsdp": fsdp,
    }
    cfg = parse_config(doc, "distill options")
    if foreground and nproc > 1:
        raise UserError("--foreground runs one process: drop --nproc, or run without --foreground")
    _check_processes(nproc, cfg.device)
    from surgery.distill.world import check_world_size

    check_world_size(cfg.batch_size, cfg.grad_accum, nproc)  # before a job directory exists
    if print_job:
        typer.echo(cfg.to_json(), nl=False)
        return
    check = check_job(cfg)  # vocabularies, widths, layer map, data paths: before anything is created
    if check.cache_manifest is not None:
        from surgery.distill.prepare import check_cache_key

        check_cache_key(cfg, check)  # a cache for another teacher, data or k: refused before a job exists
    for w in check.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    if out_dir is not None:
        from surgery.export import check_output_dir

        check_output_dir(out_dir, overwrite)
    _launch(cfg.to_json(), nproc, jobs_dir, foreground, json_out)


def _check_processes(nproc: int, device: str) -> None:
    """--nproc and the job's device against this machine, before a job directory exists or a process starts (the
    job would otherwise fail seconds later, or divide by zero processes).

    Raises:
        UserError: nproc < 1; a device this machine lacks; more processes than GPUs where each takes its own.
    """
    from surgery.errors import UserError

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1 (got {nproc})")
    import torch

    from surgery.distill.world import pick_device

    dev = pick_device(device)  # cuda / mps this machine lacks: one line now
    if dev.type == "cuda" and device in ("auto", "cuda") and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc}: each process takes its own GPU (cuda:<local rank>) but this machine has "
                        f"{torch.cuda.device_count()}: use at most that many, or --device cpu")


def _launch(job_json: str, nproc: int, jobs_dir: Path | None, foreground: bool, json_out: bool) -> None:
    from surgery.jobs.store import create_job, jobs_root

    _run(create_job(jobs_root(jobs_dir), job_json), nproc, foreground, json_out, resume=False)


def _run(job, nproc: int, foreground: bool, json_out: bool, *, resume: bool) -> None:
    """Run `job` here (`foreground`: report its end, exit with its code) or detached (report the pid at once)."""
    if foreground:
        from surgery.jobs.runner import check_runnable
        from surgery.jobs.worker import run_job

        if resume:
            check_runnable(job)
            job.cancel_file.unlink(missing_ok=True)  # an old request must not cancel the new attempt (as detached)
        code = run_job(job.path)
        _report(job, json_out)
        if code:
            raise typer.Exit(code)
        return
    from surgery.jobs.runner import start_job

    proc = start_job(job, nproc=nproc, resume=resume)
    if json_out:
        print_json({"id": job.id, "path": str(job.path), "pid": proc.pid, "state": "running"})
    elif resume:
        out.print(f"[green]resumed[/] job {job.id} (pid {proc.pid}); follow it with: workbench jobs logs {job.id} -f")
    else:
        out.print(f"[green]started[/] job {job.id} (pid {proc.pid}) in {job.path}")
        out.print(f"follow it with: workbench jobs logs {job.id} --follow")


def _report(job, json_out: bool) -> None:
    from surgery.jobs.status import job_status

    status = job_status(job)
    if json_out:
        print_json(status.to_dict())
        return
    line = f"job {job.id}: {status.state} at step {status.step}/{status.steps}"
    if status.output:
        line += f"; model in {status.output}"
    if status.error:
        line += f"; {status.error}"
    (out if status.state in ("done", "cancelled") else err).print(line)


def _age(t: float | None) -> str:
    if t is None:
        return "-"
    s = time.time() - t
    return f"{s:.0f}s ago" if s < 120 else (f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago")


@app.command("list")
def list_jobs(jobs_dir: JobsDirOpt = None, json_out: JsonOpt = False) -> None:
    """Every job with its state, step and latest loss."""
    from rich.table import Table

    from surgery.jobs.status import job_status
    from surgery.jobs.store import jobs_root, list_jobs

    root = jobs_root(jobs_dir)
    statuses = [job_status(j) for j in list_jobs(root)]
    if json_out:
        print_json([s.to_dict() for s in statuses])
        return
    if not statuses:
        out.print(f"no jobs in {root}")
        return
    table = Table(box=None, header_style="bold")
    for col in ("id", "state", "step", "loss", "ppl", "updated"):
        table.add_column(col, justify="right" if col in ("step", "loss", "ppl") else "left")
    colors = {"running": "cyan", "done": "green", "failed": "red", "lost": "magenta", "cancelled": "yellow"}
    for s in statuses:
        loss = s.losses.get("total")
        ppl = (s.eval or {}).get("perplexity")
        table.add_row(s.id, f"[{colors.get(s.state, 'white')}]{s.state}[/]", f"{s.step}/{s.steps}",
                      "-" if loss is None else f"{loss:.4g}", "-" if ppl is None else f"{ppl:.4g}", _age(s.updated))
    out.print(table)


@app.command("show")
def show(job_id: IdArg, jobs_dir: JobsDirOpt = None, json_out: JsonOpt = False) -> None:
    """State, progress, latest losses and eval, checkpoints, output and (for failed or lost jobs) the error."""
    from surgery.jobs.runner import stderr_tail
    from surgery.jobs.status import job_status
    from surgery.jobs.store import find_job, jobs_root

    job = find_job(jobs_root(jobs_dir), job_id)
    status = job_status(job)
    config = job.read_config()
    if json_out:
        print_json({**status.to_dict(), "job": config})
        return
    out.print(f"[bold]{job.id}[/]  {status.state}  step {status.step}/{status.steps}  ({job.path})")
    if config.get("kind") == "compress":
        _show_compress(job, config)
    else:
        out.print(f"  teacher {config.get('teacher')}  ->  student {config.get('student')}")
        out.print(f"  losses {config.get('losses')}  T={config.get('temperature')}  lr {config.get('lr')}  "
                  f"batch {config.get('batch_size')} x {config.get('seq_len')} tokens")
    if status.losses:
        out.print("  latest losses: " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(status.losses.items())))
    if status.tokens_per_s:
        eta = f", eta {status.eta_s:.0f}s" if status.eta_s is not None else ""
        out.print(f"  {status.tokens_per_s:,.0f} tokens/s{eta}")
    if status.eval:
        out.print(f"  eval at step {status.eval.get('step')}: perplexity {status.eval.get('perplexity'):.4g}")
    if status.pid and status.state in ("running", "cancelling", "lost"):
        hb = f", heartbeat {status.heartbeat_age_s:.0f}s ago" if status.heartbeat_age_s is not None else ""
        out.print(f"  pid {status.pid}{hb}")
    out.print(f"  latest checkpoint: {status.checkpoint or 'none'}")
    if status.output:
        out.print(f"  output: {status.output}")
    if status.error:
        out.print(f"  [red]error:[/] {status.error}")
    if status.state in ("lost", "failed"):
        for line in stderr_tail(job):
            out.print(f"  [dim]stderr:[/] {line}", markup=True, highlight=False)
        out.print(f"  resume it with: workbench jobs resume {job.id}")


def _show_compress(job, config: dict) -> None:
    """The recipe's source, budget, output, phase reached and its redistillation job(s) with their states."""
    from surgery.jobs.status import job_status
    from surgery.jobs.store import JobDir
    from workbench.compress_job import resumed_phase, sub_jobs

    out.print(f"  compress {config.get('source')}  keep {config.get('target_params')} of the parameters  ->  "
              f"{config.get('out')}", markup=False, highlight=False)
    phase = resumed_phase(job)  # the last phase the job's attempts reached
    if phase:
        out.print(f"  phase reached: {phase}", markup=False, highlight=False)
    for stage, sub_id in sorted(sub_jobs(job).items()):  # siblings: the recipe runs them in its own jobs root
        st = job_status(JobDir(job.path.parent / sub_id))
        out.print(f"  stage {stage} job {sub_id}: {st.state} at step {st.step}/{st.steps} (checkpoint "
                  f"{st.checkpoint or 'none'})", markup=False, highlight=False)


@app.command("logs")
def logs(
    job_id: IdArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    jobs_dir: JobsDirOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Raw events, one JSON object per line.")] = False,
) -> None:
    """Print the job's event log (steps, losses, evals, checkpoints, the final event)."""
    import json

    from surgery.jobs.events import describe_event, read_events
    from surgery.jobs.status import job_status
    from surgery.jobs.store import find_job, jobs_root

    job = find_job(jobs_root(jobs_dir), job_id)
    steps = job.read_config().get("steps")
    offset = 0
    while True:
        events, offset = read_events(job.events_file, offset=offset)
        for e in events:
            if json_out:
                typer.echo(json.dumps(e, sort_keys=True))
            else:
                out.print(describe_event(e, steps), markup=False, highlight=False)
        if not follow:
            return
        state = job_status(job).state
        if state not in ("running", "cancelling"):
            events, offset = read_events(job.events_file, offset=offset)  # anything written while we looked
            for e in events:
                typer.echo(json.dumps(e, sort_keys=True)) if json_out else out.print(
                    describe_event(e, steps), markup=False, highlight=False)
            if state == "lost":
                err.print(f"job {job.id} is lost: its process vanished without a final event")
            return
        time.sleep(0.5)


@app.command("cancel")
def cancel(
    job_id: IdArg,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job has stopped.")] = False,
    jobs_dir: JobsDirOpt = None,
) -> None:
    """Ask a running job to stop after its current step (it writes a checkpoint first; resume continues)."""
    from surgery.jobs.runner import request_cancel, wait_for
    from surgery.jobs.store import find_job, jobs_root

    job = find_job(jobs_root(jobs_dir), job_id)
    out.print(f"job {job.id}: {request_cancel(job)}")
    if wait:
        out.print(f"job {job.id}: {wait_for(job, timeout=24 * 3600)}")


@app.command("checkpoint")
def checkpoint_now(job_id: IdArg, jobs_dir: JobsDirOpt = None) -> None:
    """Ask a running job to write a checkpoint after its current step."""
    from surgery.jobs.runner import request_checkpoint
    from surgery.jobs.store import find_job, jobs_root

    job = find_job(jobs_root(jobs_dir), job_id)
    out.print(f"job {job.id}: {request_checkpoint(job)}")


@app.command("resume")
def resume(
    job_id: IdArg,
    nproc: NprocOpt = 1,
    jobs_dir: JobsDirOpt = None,
    foreground: Annotated[bool, typer.Option("--foreground", help="Run in this process, not detached.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Continue a failed, cancelled or lost job from its last checkpoint (refused while it runs)."""
    from surgery.distill.config import load_config
    from surgery.jobs.store import find_job, jobs_root

    job = find_job(jobs_root(jobs_dir), job_id)
    from workbench.compress_job import is_compress_job

    if is_compress_job(job):
        _resume_compress(job, nproc, foreground, json_out)
        return
    cfg = load_config(job.job_file)  # a corrupt, binary or newer-version job.json is refused here, not seconds later
    _check_processes(nproc, cfg.device)
    from surgery.jobs.runner import check_launch

    check_launch(job, nproc)  # a batch the processes cannot split, or another world size than the checkpoint's
    _run(job, nproc, foreground, json_out, resume=True)


def _resume_compress(job, nproc: int, foreground: bool, json_out: bool) -> None:
    """Continue a compress recipe from the phase it reached (finished phases reused; the redistillation from its
    job's newest checkpoint). `--foreground` waits for the job process and reports its end."""
    import subprocess
    import sys

    from surgery.errors import UserError
    from surgery.jobs.runner import check_runnable
    from workbench.compress_job import spawn

    if nproc != 1:
        raise UserError("a compress job runs one process: drop --nproc")
    check_runnable(job)  # running or done: refused before anything changes
    if foreground:  # a child process all the same: the recipe ends a cancelled attempt with os._exit
        job.cancel_file.unlink(missing_ok=True)
        code = subprocess.call([sys.executable, "-m", "workbench.compress_job", str(job.path)])
        _report(job, json_out)
        if code:
            raise typer.Exit(code)
        return
    proc = spawn(job, resume=True)
    if json_out:
        print_json({"id": job.id, "path": str(job.path), "pid": proc.pid, "state": "running"})
    else:
        out.print(f"[green]resumed[/] compress job {job.id} (pid {proc.pid}); follow it with: "
                  f"workbench jobs logs {job.id} -f")


@app.command("pipeline")
def pipeline(
    pipeline_file: Annotated[Path, typer.Argument(help="Pipeline file (JSON, \"kind\": \"pipeline\"); - reads "
                                                       "standard input.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Final model directory (written atomically).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")] = False,
    jobs_dir: JobsDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a distill -> prune -> redistill pipeline headlessly in this process (see docs/jobs.md)."""
    from surgery.jobs.pipeline import load_pipeline

    run_parsed_pipeline(load_pipeline(pipeline_file), out_dir, overwrite=overwrite, jobs_dir=jobs_dir,
                        json_out=json_out)


def run_parsed_pipeline(pipe, out_dir: Path, *, overwrite: bool, jobs_dir: Path | None, json_out: bool) -> None:
    """Run a parsed pipeline file and report it (`jobs pipeline`, and `apply` on a pipeline file it has read)."""
    from surgery.jobs.pipeline import run_pipeline
    from surgery.jobs.store import jobs_root
    from workbench.cli_common import status

    with status(not json_out) as progress:
        record = run_pipeline(pipe, out_dir, jobs_root=jobs_root(jobs_dir), overwrite=overwrite,
                              progress=progress)
    if json_out:
        print_json(record)
        return
    before, after = record["metrics"]["before"], record["metrics"]["after"]
    line = f"[green]wrote[/] {out_dir}: params {before['params']:,} -> {after['params']:,}"
    if "perplexity" in before:
        line += f", perplexity {before['perplexity']:.4g} -> {after['perplexity']:.4g}"
    out.print(line)
    for s in record["stages"]:
        out.print(f"  {s['stage']}: {s.get('job', '')} {s['output']}")
