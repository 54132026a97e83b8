"""Background jobs: a job file plus a job directory, run by a detached process that survives its parent.

Layout of one job (root = $WORKBENCH_JOBS, else `<platformdirs user data dir "workbench">/jobs`)::

    <root>/<id>/job.json          the job file (surgery.distill.config.DistillConfig), written once
                events.jsonl      append-only log, one JSON object per line (see surgery.jobs.events)
                process.json      pid, process start time, host, command of the current attempt
                heartbeat         its mtime is refreshed every few seconds while the process lives
                lock              flock-ed by the live process (what makes a second resume fail)
                cancel            present = cancel requested (the job polls it between steps)
                checkpoint-request  present = write a checkpoint after the current step
                stdout.log        the process's stdout / stderr
                stderr.log
                checkpoints/step-000050/   model.safetensors, optimizer.safetensors, state.json (no pickles)
                output/           the final HF-format model + surgery.json manifest (unless the job names --out)

Modules: `store` (paths, ids, lookup), `events` (the log), `checkpoint` (atomic save/load), `status` (running /
done / failed / cancelled / lost), `runner` (start, cancel, resume), `worker` (the job body), `__main__`
(`python -m surgery.jobs run JOBFILE`, also under torchrun).
"""
