"""MovieLens latest-small: SASRec, GRU4Rec, the LLM recommender (demo backbone, 30 layers), 8- and 4-layer students
trained without and with SLMRec distillation. Prints one table (markdown) and writes the raw records as JSON.

Every step is a `workbench rec` command (the same a user types), run in order: prepare, the LLM teacher (first, so
that its directory exists early for other experiments on the same work dir), SASRec, GRU4Rec, then the four
students; each model is evaluated with `workbench rec eval --json` right after it is trained.

The default schedule is shortened to finish on 2 shared CPU cores in about half an hour (LLM and students: 1
epoch over 300 seeded users, lr 3e-4; baselines: 30 epochs; evaluation: the first 200 test users; see
docs/benchmarks.md); `--full` is the GPU schedule (all users, 3 LLM epochs, 200 baseline epochs; pass
`--device cuda`).

    python benchmarks/rec_movielens.py [--work DIR] [--eval-users N] [--llm-users N] [--llm-epochs E]
                                       [--llm-lr LR] [--base-epochs E] [--device cpu] [--threads T] [--full]

Besides each model's numbers, results.json records the wall time of every command and the 1-minute load average
sampled every 5 s while it ran (the machine is shared: timings only compare within one run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-latest-small"
KD_LOSS = "ce:1,hidden-cos:1,hidden-l2:0.1,block-ce:0.1"
KEYS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")


class LoadSampler:
    """The 1-minute load average, sampled every `every` seconds in a background thread."""

    def __init__(self, every: float = 5.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": round(sum(s) / len(s), 2), "max": round(max(s), 2), "samples": len(s)}


ENV = dict(os.environ)


def run(cmd: list[str]) -> tuple[dict, float, dict]:
    """Run one CLI command; (its --json output, wall seconds, load average while it ran)."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with LoadSampler() as load:
        done = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {done.stderr[-2000:]}")
    print(f"  {wall:.1f} s, load {load.summary()}", file=sys.stderr, flush=True)
    return json.loads(done.stdout), wall, load.summary()


def commands(a: argparse.Namespace) -> dict[str, list[str]]:
    """Model name -> its training command, in the order they run."""
    w, wb = a.work, ["workbench", "rec"]
    d = ["--data", str(w / "data")]
    users = ["--max-users", str(a.llm_users)] if a.llm_users else []
    common = ["--device", a.device, "--overwrite", "--json", "--jobs-dir", str(w / "jobs")]
    llm = ["--epochs", str(a.llm_epochs), "--batch-size", "8", "--lr", str(a.llm_lr), *users, *common]
    base = ["--epochs", str(a.base_epochs), "--batch-size", "64", *common]
    runs = {
        "LLM teacher (30 layers)": [*wb, "train", "llm", "--backbone", "smollm2-135m", *d, "--out", str(w / "llm30"),
                                    *llm],
        "SASRec": [*wb, "train", "sasrec", *d, "--out", str(w / "sasrec"), *base],
        "GRU4Rec": [*wb, "train", "gru4rec", *d, "--out", str(w / "gru4rec"), *base],
    }
    for k in (8, 4):
        for name, loss, tag in ((f"student {k} layers, CE only", "ce:1", "ce"),
                                (f"student {k} layers, SLMRec distilled", KD_LOSS, "kd")):
            runs[name] = [*wb, "distill", "--teacher", str(w / "llm30"), "--student-layers", str(k), *d, "--loss",
                          loss, "--out", str(w / f"student{k}-{tag}"), *llm]
    return runs


def table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    lines = ["| model | params | train s/epoch (users) | infer s/1k users | "
             + " | ".join(f"full {k}" for k in KEYS) + " | " + " | ".join(f"s999 {k}" for k in KEYS) + " |",
             "|---" * (4 + 2 * len(KEYS)) + "|"]
    for r in rows:
        m, ep = r["eval"]["metrics"], r["epoch_seconds"]
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {sum(ep) / max(1, len(ep)):.1f} "
                     f"({r['train_users']}) | {r['eval']['seconds_per_1k_users']:.1f} | "
                     + " | ".join(f"{m['full'][k]:.4f}" for k in KEYS) + " | "
                     + " | ".join(f"{m['sampled-999'][k]:.4f}" for k in KEYS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/rec-bench"))
    ap.add_argument("--eval-users", type=int, default=200, help="score the first N test users (0: all)")
    ap.add_argument("--llm-users", type=int, default=300, help="train the LLM and students on N seeded users (0: all)")
    ap.add_argument("--llm-epochs", type=int, default=1)
    ap.add_argument("--llm-lr", type=float, default=3e-4, help="AdamW learning rate of the LLM and the students")
    ap.add_argument("--base-epochs", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of every command (OMP_NUM_THREADS); 1 is faster on a loaded machine")
    ap.add_argument("--full", action="store_true", help="the GPU schedule: all users, 3 LLM / 200 baseline epochs")
    a = ap.parse_args()
    if a.full:
        a.llm_users, a.eval_users, a.llm_epochs, a.base_epochs = 0, 0, 3, 200
    if a.threads is not None:
        ENV["OMP_NUM_THREADS"] = str(a.threads)  # torch's intra-op thread count in the child processes
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    started = time.time()
    _, wall, load = run(["workbench", "rec", "prepare", str(DATA), "--out", str(w / "data"), "--overwrite", "--json"])
    meta = {"argv": sys.argv, "schedule": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "prepare": {"wall_s": round(wall, 1), "load": load}}
    rows: list[dict] = []
    eval_users = ["--max-users", str(a.eval_users)] if a.eval_users else []
    for name, cmd in commands(a).items():
        trained, wall, load = run(cmd)
        outdir = trained["output"]
        doc = json.loads((Path(outdir) / "rec.json").read_text())
        ev, eval_wall, eval_load = run(["workbench", "rec", "eval", outdir, "--data", str(w / "data"), "--protocol",
                                        "full", "--protocol", "sampled-999", *eval_users, "--device", a.device,
                                        "--json"])
        rows.append({"name": name, "command": " ".join(cmd), "train_wall_s": round(wall, 1), "train_load": load,
                     "eval_wall_s": round(eval_wall, 1), "eval_load": eval_load,
                     "epoch_seconds": doc["train"]["epoch_seconds"], "train_users": doc["train"]["train_users"],
                     "params": doc["params"], "eval": ev})
        (w / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    meta["total_wall_s"] = round(time.time() - started, 1)
    (w / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (w / "table.md").write_text(table(rows))
    print(table(rows), end="")
    print(f"total {meta['total_wall_s']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
