"""Two distillation jobs compared step by step on the same batches: a cheap probe of a recipe change.

Why it is fair: jobs with the same data, seed, batch size and seq_len draw the same blocks at every step, and a
step's `ce` is logged before its update, on blocks the student has not trained on yet in the first epoch: each
step's ce is a held-out next-token loss of the student after the previous steps, on identical text in both jobs.
The mean difference (B - A) over the common steps, and exp(mean) as a perplexity ratio, say which recipe is ahead
at equal tokens long before either job finishes or is evaluated.

Run: python benchmarks/paired_steps.py JOB_A JOB_B [--from-step 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def step_ce(job: Path) -> tuple[dict[int, float], dict]:
    """{step: ce} of a job's step events (the last one per step, after a resume) and its job file."""
    ce: dict[int, float] = {}
    for line in (job / "events.jsonl").read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event.get("event") == "step" and "ce" in event.get("losses", {}):
            ce[event["step"]] = event["losses"]["ce"]
    return ce, json.loads((job / "job.json").read_text(encoding="utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job_a", type=Path)
    parser.add_argument("job_b", type=Path)
    parser.add_argument("--from-step", type=int, default=2, help="first step compared (step 1 is the same model)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    (a, cfg_a), (b, cfg_b) = step_ce(args.job_a), step_ce(args.job_b)
    same = ("data", "seed", "batch_size", "seq_len", "student")
    differ = [k for k in same if cfg_a.get(k) != cfg_b.get(k)]
    if differ:
        raise SystemExit(f"the jobs do not draw the same batches: {', '.join(differ)} differ")
    steps = sorted(s for s in set(a) & set(b) if s >= args.from_step)
    if not steps:
        raise SystemExit("no common steps to compare")
    diffs = [b[s] - a[s] for s in steps]
    mean = statistics.fmean(diffs)
    sem = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    recipe = ("losses", "temperature", "lr", "schedule", "warmup_steps", "steps")
    result = {"a": {k: cfg_a.get(k) for k in recipe}, "b": {k: cfg_b.get(k) for k in recipe},
              "steps": [steps[0], steps[-1]], "n": len(steps), "mean_ce_diff": mean, "sem": sem,
              "ppl_ratio": math.exp(mean), "b_lower_on": sum(d < 0 for d in diffs),
              "per_step": {s: [a[s], b[s]] for s in steps}}
    print(json.dumps({k: v for k, v in result.items() if k != "per_step"}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
