"""Peak RSS of each rank of a 2-rank FSDP distillation job on the demo model, before and after "only rank 0 reads
the weights", against one process, side by side in one run.

before  a checkout of the code to compare with (--before DIR, e.g. `git worktree add /tmp/h4wt <commit>`): every
        rank loads student and teacher whole to CPU, then shards them.
after   this checkout: every rank builds both models on the meta device, rank 0 alone reads them and broadcasts
        the shards (surgery.distill.fsdp.shard_from_rank0).
one     this checkout, one process without FSDP (the same job otherwise).

Job: teacher and student = the demo model (SmolLM2-135M, fp32, tied embeddings), kl 1.0 + ce 0.1, seq len 32,
batch 2, 2 steps, --device cpu, on WikiText-2 (the first --tokens tokens of the test split). Each FSDP tree runs two
jobs: "fresh" (2 steps from the start), and "resume": a job cancelled before its first step (so it writes a DCP
checkpoint at step 0: the "load" row, loading, sharding and that checkpoint) then run again, which loads that
sharded checkpoint and runs the 2 steps. glibc keeps much of what FSDP's per-layer all-gathers free (RSS grows
through a step); MALLOC_MMAP_THRESHOLD_=131072 in the environment (passed to every process) shows the peak without
that retention. Each rank is its own `python -m surgery.jobs run JOB` process (RANK / WORLD_SIZE / MASTER_PORT
set as torchrun sets them), reaped with os.wait4, so its ru_maxrss is its own peak RSS. One thread per process.
The loss curves of before and after are compared (they must be equal: the same weights reach the same shards).

Run: nice -n 10 python benchmarks/fsdp_memory.py --before /tmp/h4wt [--tokens N] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def job_doc(data: Path, fsdp: bool) -> dict:
    return {"version": 1, "teacher": "smollm2-135m", "student": "smollm2-135m", "data": str(data),
            "losses": {"kl": 1.0, "ce": 0.1}, "steps": 2, "seq_len": 32, "batch_size": 2, "lr": 1e-4,
            "checkpoint_every": 100, "seed": 7, "device": "cpu", "fsdp": fsdp}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tree: Path, job: Path, nproc: int) -> list[dict]:
    """Run the job in `nproc` rank processes of `tree`'s code; per rank: peak RSS (MB), wall s, exit code."""
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        base.pop(k, None)
    if nproc > 1:
        base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc))
    t0 = time.perf_counter()
    procs = []
    for r in range(nproc):
        env = {**base, **({"RANK": str(r), "LOCAL_RANK": str(r)} if nproc > 1 else {})}
        log = open(job.parent / f"{job.name}.rank{r}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "surgery.jobs", "run", str(job)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT, cwd=tree), log))
    out, reaped = [], set()
    try:
        for r, (p, log) in enumerate(procs):
            _, status, usage = os.wait4(p.pid, 0)
            reaped.add(r)
            log.close()
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                raise SystemExit(f"rank {r} of {job} ({tree}) exited {code}:\n"
                                 + (job.parent / f"{job.name}.rank{r}.log").read_text()[-3000:])
            out.append({"rank": r, "rss_mb": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - t0})
    finally:  # a failed rank or a stopped benchmark: the other ranks would wait in a collective for ever
        for r, (p, _) in enumerate(procs):
            if r not in reaped:
                p.kill()
                os.waitpid(p.pid, 0)
    return out


def losses(job: Path) -> list[float]:
    events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines() if line.strip()]
    return [e["losses"]["total"] for e in events if e["event"] == "step"]


def check_tree(tree: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    where = subprocess.run([sys.executable, "-c", "import surgery; print(surgery.__file__)"], env=env, cwd=tree,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(tree)):
        raise SystemExit(f"PYTHONPATH={tree} imports surgery from {where}: cannot compare the trees")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the code before the change")
    parser.add_argument("--tokens", type=int, default=4096, help="training tokens (the job's max_tokens)")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally that stops the ranks
    sys.path.insert(0, str(ROOT))
    from surgery.jobs.store import create_job

    trees = {"before": args.before.resolve(), "after": ROOT}
    for tree in trees.values():
        check_tree(tree)
    work = Path(args.work or tempfile.mkdtemp(prefix="fsdp_memory_"))
    data = work / "wiki_test.txt"
    work.mkdir(parents=True, exist_ok=True)
    data.write_text(WIKI.read_text()[: args.tokens * 8])  # ~4 characters a token: enough text for max_tokens

    def new_job(name: str, fsdp: bool, cancelled: bool = False) -> Path:
        doc = {**job_doc(data, fsdp), "max_tokens": args.tokens}
        job = create_job(work / name, json.dumps(doc)).path
        if cancelled:
            (job / "cancel").write_text("")
        return job

    rows, curves = [], {}
    for label, tree in trees.items():
        job = new_job(f"{label}-fresh", True)
        rows.append((label, "fresh", run_ranks(tree, job, 2)))
        curves[label] = losses(job)
        job = new_job(f"{label}-resume", True, cancelled=True)
        # cancelled before step 0: loading and sharding both models, then the sharded checkpoint of step 0
        rows.append((label, "load", run_ranks(tree, job, 2)))
        (job / "cancel").unlink()
        rows.append((label, "resume", run_ranks(tree, job, 2)))
        curves[f"{label}-resume"] = losses(job)
    job = new_job("one-process", False)
    one = run_ranks(ROOT, job, 1)[0]
    curves["one"] = losses(job)

    print(f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', '(unset: glibc default)')}")
    print(f"2-rank FSDP job on the demo model (teacher = student = SmolLM2-135M fp32), {args.tokens} tokens, "
          f"peak RSS per rank (MB); one process without FSDP: {one['rss_mb']:,.0f} MB ({one['wall_s']:.1f} s)")
    print(f"{'code':<8}{'run':<8}{'rank 0':>10}{'rank 1':>10}{'sum':>10}{'sum / one':>11}{'wall s':>8}")
    by = {}
    for label, run, ranks in rows:
        total = sum(r["rss_mb"] for r in ranks)
        by[(label, run)] = ranks
        print(f"{label:<8}{run:<8}{ranks[0]['rss_mb']:>10,.0f}{ranks[1]['rss_mb']:>10,.0f}{total:>10,.0f}"
              f"{total / one['rss_mb']:>11.2f}{max(r['wall_s'] for r in ranks):>8.1f}")
    for run in ("fresh", "load", "resume"):
        b, a = by[("before", run)], by[("after", run)]
        print(f"{run}: after / before  rank 0 {a[0]['rss_mb'] / b[0]['rss_mb']:.2f}, "
              f"rank 1 {a[1]['rss_mb'] / b[1]['rss_mb']:.2f}")
    same = curves["before"] == curves["after"] and curves["before-resume"] == curves["after-resume"]
    print(f"loss curves before == after (fresh and resumed): {same}; fresh {curves['after']}, "
          f"one process {curves['one']}")
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
