"""`python -m surgery.jobs run JOBFILE`: run a job in this process (the detached runner and torchrun call this).

JOBFILE is a job directory, the job.json inside one, or any job file (a new job directory is then created under
--jobs-dir / $WORKBENCH_JOBS / the user data dir; under torchrun, rank 0 creates it and tells the others).
A job that has checkpoints continues from the newest one. Exit codes: 0 done or cancelled, 2 bad input, 1 bug.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from surgery.errors import UserError


def _job_dir(target: Path, jobs_dir: str | None) -> Path:
    """The job directory to run for `target` (see the module docstring)."""
    if target.is_dir():
        return target
    if target.name == "job.json" and (target.parent / "checkpoints").is_dir():
        return target.parent
    from surgery.distill.config import load_config
    from surgery.jobs.store import create_job, jobs_root

    cfg = load_config(target).with_paths_from(target.parent)  # validate before making anything
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return create_job(jobs_root(jobs_dir), cfg.to_json()).path
    from surgery.distill.world import init_world

    world = init_world(cfg.device, fsdp=cfg.fsdp)
    # rank 0 creates the directory and sends its path to the others
    path = str(create_job(jobs_root(jobs_dir), cfg.to_json()).path) if world.is_main else None
    return Path(world.broadcast_text(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgery.jobs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job in this process")
    run.add_argument("jobfile", type=Path)
    run.add_argument("--jobs-dir", default=None, help="where a new job directory is created for a loose job file")
    args = parser.parse_args(argv)
    try:
        from surgery.jobs.worker import run_job

        path = _job_dir(args.jobfile.expanduser(), args.jobs_dir)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"job directory: {path}", file=sys.stderr, flush=True)
        return run_job(path)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
