"""Perplexity of a distillation job's checkpoints, evaluated beside the running job instead of inside it.

Why: an in-job evaluation of the 32 x 2,048 WikiText-2 blocks pauses training for minutes on a busy CPU, and a
job evaluates at every `eval_every` step including step 0 (already known for a student measured before). This
script waits for the checkpoints of the steps asked for, reads each as soon as it is complete (a job keeps only
the newest two), loads its student weights into the job's student model and measures perplexity on the same blocks
`workbench eval` uses. The training itself is untouched, so the curve is the one job's.

Run: python benchmarks/eval_checkpoints.py --job JOB_DIR --steps 25,50 --data wiki.test.raw --tokens 65536
    --seq-len 2048 --threads 1 [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def wait_for_checkpoint(job: Path, step: int, poll_s: float) -> Path:
    """The complete checkpoint directory of `step` once the job has written it."""
    from surgery.jobs.checkpoint import checkpoint_name, list_checkpoints

    name = checkpoint_name(step)
    while True:
        found = [p for p in list_checkpoints(job / "checkpoints") if p.name == name]
        if found:
            return found[0]
        time.sleep(poll_s)


def evaluate_checkpoint(student: str, checkpoint: Path, blocks) -> dict:
    """Load the checkpoint's `student.*` tensors into the student and measure perplexity on `blocks`."""
    from surgery.jobs.checkpoint import load_checkpoint
    from surgery.loading import load_model
    from surgery.metrics.perplexity import perplexity

    tensors, _ = load_checkpoint(checkpoint)  # read at once: the job deletes it two checkpoints later
    model = load_model(student, dtype="float32").model
    named = dict(model.named_parameters())
    weights = {k.removeprefix("student."): v for k, v in tensors.items() if k.startswith("student.")}
    if set(weights) != set(named):
        raise SystemExit(f"{checkpoint}: its student tensors do not match {student}'s parameters")
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value)
    model.eval()
    t0 = time.perf_counter()
    result = perplexity(model, blocks)
    return {"checkpoint": checkpoint.name, "perplexity": result.perplexity,
            "eval_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, required=True, help="the job directory (jobs-dir/<id>)")
    parser.add_argument("--steps", required=True, help="comma-separated checkpoint steps, e.g. 25,50")
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--poll-s", type=float, default=20.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from surgery.data import load_blocks
    from surgery.loading import load_tokenizer

    job_file = json.loads((args.job / "job.json").read_text(encoding="utf-8"))
    student = job_file["config"]["student"] if "config" in job_file else job_file["student"]
    blocks = load_blocks(args.data, load_tokenizer(student), args.seq_len, args.tokens)
    rows = []
    for step in (int(s) for s in args.steps.split(",")):
        row = {"step": step, **evaluate_checkpoint(student, wait_for_checkpoint(args.job, step, args.poll_s), blocks)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"student": student, "targets": blocks.describe(), "rows": rows},
                                            indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
