"""`workbench compress` as a background job, for the TUI's jobs panel: a job directory like a distill job's (job.json,
events.jsonl, lock, process.json, stdout/stderr logs) whose process runs `surgery.compress.compress`.

The parent (the TUI) validates the form, writes job.json and spawns `python -m workbench.compress_job JOBDIR` in its
own session, so the recipe survives quitting the TUI or a dropped SSH link. The child holds the job's lock while it
runs, turns each progress message into a `status` event and each recipe phase into a `step` event (so `workbench
jobs list` and the jobs panel show "3/7"), and ends with `done` (its output directory) or `failed`. The job
directory is also the recipe's work directory (scores, plan.json, the generated pipeline.json, prelude.json and
pipeline/ with the stages' models and progress.json), so `workbench jobs resume ID` continues from the phase it
reached. The redistillation stage is a distill job of its own in the same jobs root, with its loss curve, run in
this process (so it dies with it). Cancelling (`x` in the panel, `workbench jobs cancel`, SIGTERM) reaches that
job when it runs (it checkpoints and ends `cancelled`, then so does the recipe); in any other phase the process
stops within a second. The output directory is written atomically at the very end, so a cancelled recipe leaves no
partial output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

KIND = "compress"
# the recipe's phases as surgery.compress / run_pipeline announce them (progress messages starting with these)
PHASES = ("scoring", "suggesting a plan", "adding the reconstruction step", "measuring the base model",
          "stage 0", "stage 1", "measuring stage 1")


def phases_for(options: dict) -> tuple[str, ...]:
    return tuple(p for p in PHASES if options.get("reconstruct", True) or p != "adding the reconstruction step")


def parse_options(text: str) -> dict:
    """"seq_len=256 non_uniform=yes" -> CompressOptions fields, each converted to its default's type (pure).

    Raises:
        UserError: An unknown field or a value of the wrong type (the message lists the fields).
    """
    from dataclasses import fields as dc_fields

    from surgery.compress import CompressOptions
    from surgery.errors import UserError

    known = {f.name: f for f in dc_fields(CompressOptions) if f.name not in ("data", "tokens", "eval_data")}
    defaults = CompressOptions(data="", tokens=0)
    options: dict = {}
    for item in text.replace(",", " ").split():
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in known or not value:
            simple = [k for k, f in known.items() if isinstance(getattr(defaults, k), (int, float, str, bool))]
            raise UserError(f"compress form: options: {item!r}: expected NAME=VALUE with NAME one of "
                            f"{', '.join(simple)}")
        default = getattr(defaults, key)
        try:
            if isinstance(default, bool):
                options[key] = value.lower() in ("1", "y", "yes", "true", "on")
            elif isinstance(default, (int, float)) or default is None:
                options[key] = int(value) if isinstance(default, int) or default is None else float(value)
            elif isinstance(default, str):
                options[key] = value
            else:
                raise ValueError(f"{key} cannot be set here (use `workbench compress`)")
        except ValueError as exc:
            raise UserError(f"compress form: options: {key}: {exc}") from None
    return options


def compress_document(fields: dict) -> dict:
    """The job document of the compress form's fields (paths made absolute: the job runs in its own directory).

    Raises:
        UserError: A field that is not a number where one is needed, a fraction outside (0, 1), a missing data
            file, an output directory that is not empty, a budget below one redistillation step.
    """
    from surgery.compress import CompressOptions, redistill_steps
    from surgery.errors import UserError
    from surgery.export import check_output_dir

    def absolute(value: str) -> str:
        return value if value.startswith("hf:") else str(Path(value).expanduser().resolve())

    try:
        target = float(fields["target_params"])
        tokens = int(fields["tokens"])
    except ValueError as exc:
        raise UserError(f"compress form: {exc}") from None
    if not 0 < target < 1:
        raise UserError(f"compress form: keep {target}: the fraction of parameters kept, strictly between 0 and 1")
    for name in ("data", "out"):
        if not fields.get(name):
            raise UserError(f"compress form: {name} is needed")
    for name in ("data", "eval_data"):
        value = fields.get(name) or ""
        if value and not value.startswith("hf:") and not Path(value).expanduser().is_file():
            raise UserError(f"compress form: {name}: no such file: {value}")
    out = absolute(fields["out"])
    check_output_dir(Path(out), False)
    source = fields["source"]
    if Path(source).expanduser().exists():
        source = absolute(source)
    options = {"data": absolute(fields["data"]), "tokens": tokens, **parse_options(fields.get("options") or "")}
    if fields.get("eval_data"):
        options["eval_data"] = absolute(fields["eval_data"])
    redistill_steps(CompressOptions(**options))  # a budget below one step is refused before anything starts
    return {"version": 1, "kind": KIND, "source": source, "target_params": target, "out": out,
            "options": options, "steps": len(phases_for(options))}


def start_compress(root: Path, fields: dict) -> str:
    """Validate the form, create the job and spawn its detached process; returns the job id."""
    from surgery.jobs.store import create_job

    doc = compress_document(fields)
    job = create_job(root, json.dumps(doc, indent=2, sort_keys=True) + "\n", kind=KIND)
    spawn(job)
    return job.id


def run_in_session(session: str, home: Path | None, source: str, target_params: float, out: Path | None, opts,
                   *, jobs_dir: Path | None, overwrite: bool, quiet: bool) -> tuple[dict, Path]:
    """`workbench compress --session NAME`: the recipe as a job in the session's jobs/ (the session is made from
    `source` when missing), followed here until it ends; returns the record and the output directory.

    The job runs detached, so a dropped terminal does not stop it; Ctrl-C asks it to cancel (it stops at its
    next phase or redistillation step) and says how to resume.

    Raises:
        UserError: Bad input (before the session or the job is touched where it can be), or a failed recipe.
    """
    from dataclasses import asdict

    from sessions import Session, check_name, describe_source, sessions_root
    from surgery.compress import check_inputs
    from surgery.errors import UserError
    from surgery.jobs.runner import request_cancel, wait_for
    from surgery.jobs.status import job_status
    from surgery.jobs.store import create_job, jobs_root
    from workbench.cli_common import err, status

    name = check_name(session)
    path = sessions_root(home) / name
    out = Path(out) if out is not None else path / "exports" / f"compressed-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.expanduser().resolve()
    check_inputs(out, target_params, opts, overwrite)  # before the session is made or touched
    with status(not quiet) as progress:
        model = describe_source(source, progress=progress)
    s, _ = Session.open_or_create(name, model, root=path.parent)
    other = s.model.fingerprint != model.fingerprint
    s.close()
    if other:
        err.print(f"[yellow]warning:[/] session {name!r} was made for other weights than {source}: the run is "
                  "recorded there all the same")
    options = asdict(opts)
    for key in ("data", "eval_data"):
        if options[key] and not options[key].startswith("hf:"):
            options[key] = str(Path(options[key]).expanduser().resolve())
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())
    doc = {"version": 1, "kind": KIND, "source": source, "target_params": target_params, "out": str(out),
           "overwrite": overwrite, "options": options, "steps": len(phases_for(options))}
    job = create_job(jobs_root(jobs_dir if jobs_dir is not None else path / "jobs"),
                     json.dumps(doc, indent=2, sort_keys=True) + "\n", kind=KIND)
    resume = f"workbench jobs resume {job.id} --jobs-dir {job.path.parent}"
    spawn(job)
    err.print(f"compress job {job.id} in session {name!r} (it runs on if this terminal goes; resume: {resume})")
    try:
        with status(not quiet) as progress:
            offset = 0
            while job_status(job).state in ("created", "running", "cancelling"):
                from surgery.jobs.events import read_events

                events, offset = read_events(job.events_file, offset=offset)
                for e in events:
                    if e["event"] == "status":
                        progress(str(e.get("message", "")))
                time.sleep(0.5)
    except KeyboardInterrupt:
        request_cancel(job)
        wait_for(job, timeout=600)
    st = job_status(job)
    if st.state != "done":
        raise UserError(f"compress job {job.id} {st.state}" + (f": {st.error}" if st.error else "") +
                        (f" (resume: {resume})" if st.state in ("cancelled", "lost") else ""))
    return json.loads((out / "pipeline.json").read_text(encoding="utf-8")), out


def is_compress_job(job) -> bool:
    """Whether a job directory holds a compress recipe (not a distill job)."""
    try:
        return job.read_config().get("kind") == KIND
    except Exception:  # noqa: BLE001 - a corrupt job.json is not ours to judge here
        return False


def spawn(job, *, resume: bool = False) -> subprocess.Popen:
    """Start the job's detached process (own session: it survives the TUI and the SSH link); returns its handle.

    Raises:
        JobRunning: A process of the job is alive (nothing is started).
    """
    from surgery.jobs.runner import launch_process

    # locked and inherited (surgery.jobs.runner.launch_process, as for start_job): the job reads "running" from
    # the first moment, not "lost" while the child is still importing torch
    return launch_process(job, [sys.executable, "-m", "workbench.compress_job", str(job.path)], nproc=1,
                          resume=resume)


def sub_jobs(job) -> dict[str, str]:
    """The recipe's training-stage jobs so far, stage index -> job id (from its pipeline progress)."""
    try:
        return dict(json.loads((job.path / "pipeline" / "progress.json").read_text(encoding="utf-8"))["jobs"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def run(path: str | Path) -> int:
    """The job process: run (or continue) the recipe, log its progress; 0 done or cancelled, 2 bad input, 1 a bug.

    A cancel request (the `cancel` file, or SIGTERM) during the redistillation is forwarded to that job, which
    checkpoints and ends `cancelled`; then this job ends `cancelled`. During the other phases the process ends at
    once (`cancelled`): what finished is on disk in the job directory, and `workbench jobs resume` continues from
    there. A SIGKILL takes the redistillation with it (it runs in this process), and both read `lost`.
    """
    import signal
    import traceback

    from surgery.compress import CompressOptions, compress
    from surgery.errors import UserError
    from surgery.jobs.events import EventLog
    from surgery.jobs.pipeline import PipelineCancelled
    from surgery.jobs.runner import LOCK_FD_ENV, acquire_lock, write_process_record
    from surgery.jobs.store import JobDir

    job = JobDir(Path(path).resolve())
    log = EventLog(job.events_file)
    if LOCK_FD_ENV not in os.environ:  # started by hand: take the lock here (the fd stays open until exit)
        acquire_lock(job)
        write_process_record(job, os.getpid(), command="foreground", attempt=None)
        log.append("launch", pid=os.getpid(), attempt=None, nproc=1, resume=resumed_phase(job) is not None)
    # the inherited fd is this job's lock; the redistillation job run in this process must take its own
    os.environ.pop(LOCK_FD_ENV, None)
    doc = job.read_config()
    options = doc["options"]
    phases = phases_for(options)
    done = {"step": 0}
    guard = threading.RLock()  # one decision at a time: forward to the running sub-job, or end here
    current: dict = {"sub": None, "ended": False}

    def progress(message: str) -> None:
        log.append("status", message=message)
        for i, phase in enumerate(phases, start=1):
            if message.startswith(phase) and i > done["step"]:
                done["step"] = i
                log.append("step", step=i, phase=phase, losses={})

    def end_cancelled(**extra) -> None:
        with guard:
            if not current["ended"]:
                current["ended"] = True
                log.append("cancelled", step=done["step"], checkpoint=None, sync=True, **extra)
            os._exit(0)  # the output is only written, atomically, at the very end: nothing partial is left

    def on_job(sub) -> None:
        with guard:
            current["sub"] = sub
        if sub is not None and job.cancel_file.exists():
            forward(sub)

    def forward(sub) -> None:
        from surgery.plan import write_text_atomic

        if not sub.cancel_file.exists():
            write_text_atomic(sub.cancel_file, json.dumps({"requested": round(time.time(), 3), "by": job.id}) + "\n")

    def watch() -> None:  # a long stage (scoring, redistilling) says nothing for minutes
        while True:
            if job.cancel_file.exists():
                with guard:  # held while deciding: no sub-job can start between the look and the exit
                    sub = current["sub"]
                    if sub is None:
                        end_cancelled()
                forward(sub)  # it stops after its current step; the main thread then ends this job
            time.sleep(0.5)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: job.cancel_file.touch())
    threading.Thread(target=watch, daemon=True).start()
    log.append("start", step=0, pid=os.getpid(), world_size=1, device=options.get("device", "cpu"),
               resumed_from=resumed_phase(job), train=options["data"])
    try:
        record = compress(doc["source"], doc["target_params"], doc["out"], CompressOptions(**options),
                          jobs_root=job.path.parent, progress=progress, work=job.path, on_job=on_job,
                          overwrite=bool(doc.get("overwrite")))
    except PipelineCancelled as exc:
        end_cancelled(sub_job=exc.job, sub_checkpoint=exc.checkpoint)
    except UserError as exc:
        log.append("failed", step=done["step"], error=str(exc).splitlines()[0], error_type=type(exc).__name__,
                   traceback=None, sync=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: the event keeps the traceback for the report
        log.append("failed", step=done["step"], error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__,
                   traceback=traceback.format_exc(), sync=True)
        return 1
    from sessions.runs import keep_scores

    keep_scores(job.path)  # a run in a session leaves its scores there, as scoring in the TUI does
    after = record["metrics"].get("after") or {}
    log.append("eval", step=len(phases), **{k: v for k, v in after.items() if k in ("params", "perplexity")})
    log.append("done", step=len(phases), output=doc["out"], manifest={"after": after}, sync=True)
    return 0


def resumed_phase(job) -> str | None:
    """The last phase an earlier attempt reached (None on a first start)."""
    from surgery.jobs.events import read_events

    phases = [e.get("phase") for e in read_events(job.events_file)[0] if e.get("event") == "step"]
    return phases[-1] if phases else None


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
