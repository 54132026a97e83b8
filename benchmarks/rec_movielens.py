"""MovieLens latest-small: SASRec, GRU4Rec, the LLM recommender (demo backbone, 30 layers), 8- and 4-layer students
trained without and with SLMRec distillation. Prints one table (markdown) and writes the raw records as JSON.

Every run is shortened to finish on 2 CPU cores in minutes (see SCHEDULE); on a GPU pass --full for the full
schedule. Usage: python benchmarks/rec_movielens.py [--work DIR] [--eval-users N] [--full]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-latest-small"


def run(cmd: list[str]) -> tuple[dict, float]:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/rec-bench"))
    ap.add_argument("--eval-users", type=int, default=200)
    ap.add_argument("--full", action="store_true", help="full schedule (GPU): all users, more epochs")
    a = ap.parse_args()
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    wb = ["workbench", "rec"]
    llm_users = [] if a.full else ["--max-users", "96"]
    llm_epochs = "3" if a.full else "1"
    base_epochs = "200" if a.full else "30"
    common = ["--overwrite", "--json", "--jobs-dir", str(w / "jobs")]
    run([*wb, "prepare", str(DATA), "--out", str(w / "data"), "--overwrite", "--json"])
    d = ["--data", str(w / "data")]
    runs = {
        "SASRec": [*wb, "train", "sasrec", *d, "--out", str(w / "sasrec"), "--epochs", base_epochs, "--batch-size",
                   "64", *common],
        "GRU4Rec": [*wb, "train", "gru4rec", *d, "--out", str(w / "gru4rec"), "--epochs", base_epochs,
                    "--batch-size", "64", *common],
        "LLM teacher (30 layers)": [*wb, "train", "llm", "--backbone", "smollm2-135m", *d, "--out", str(w / "llm30"),
                                    "--epochs", llm_epochs, "--batch-size", "8", "--lr", "3e-4", *llm_users, *common],
    }
    for k in (8, 4):
        for name, loss in ((f"student {k} layers, CE only", "ce:1"),
                           (f"student {k} layers, SLMRec distilled", "ce:1,hidden-cos:1,hidden-l2:0.1,block-ce:0.1")):
            runs[name] = [*wb, "distill", "--teacher", str(w / "llm30"), "--student-layers", str(k), *d, "--loss",
                          loss, "--out", str(w / f"student{k}-{'kd' if 'hidden' in loss else 'ce'}"),
                          "--epochs", llm_epochs, "--batch-size", "8", "--lr", "3e-4", *llm_users, *common]
    rows = []
    for name, cmd in runs.items():
        trained, wall = run(cmd)
        outdir = trained["output"]
        doc = json.loads((Path(outdir) / "rec.json").read_text())
        ev, _ = run([*wb, "eval", outdir, *d, "--protocol", "full", "--protocol", "sampled-999", "--max-users",
                     str(a.eval_users), "--json"])
        rows.append({"name": name, "command": " ".join(cmd), "train_wall_s": round(wall, 1),
                     "epoch_seconds": doc["train"]["epoch_seconds"], "train_users": doc["train"]["train_users"],
                     "params": doc["params"], "eval": ev})
        (w / "results.json").write_text(json.dumps(rows, indent=2))
    keys = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")
    print("| model | params | train s/epoch (users) | infer s/1k users | " + " | ".join(
        f"full {k}" for k in keys) + " | " + " | ".join(f"s999 {k}" for k in keys) + " |")
    print("|---" * (4 + 2 * len(keys)) + "|")
    for r in rows:
        m = r["eval"]["metrics"]
        ep = r["epoch_seconds"]
        print(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {sum(ep) / max(1, len(ep)):.1f} ({r['train_users']}) | "
              f"{r['eval']['seconds_per_1k_users']:.1f} | " + " | ".join(f"{m['full'][k]:.4f}" for k in keys) + " | "
              + " | ".join(f"{m['sampled-999'][k]:.4f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
