"""DLLM2Rec on MovieLens latest-small: SASRec and GRU4Rec trained plainly and with DLLM2Rec from the LLM recommender
(the teacher), beside the teacher. HR@1/5/10, NDCG@5/10, MRR under full ranking and sampled-999, parameters,
training seconds per epoch and inference seconds per 1k users. Prints a markdown table, writes results.json.

The teacher: the LLM recommender of benchmarks/rec_movielens.py (`<rec-bench>/llm30` and its `<rec-bench>/data`)
when it exists, else one trained here with that script's command (smollm2-135m, 96 users, 1 epoch).

`--teacher DIR --data DIR` use any trained LLM recommender and its prepared data instead (e.g. an E4SRec-style
teacher trained with `rec train llm --item-init <sasrec>`; docs/benchmarks.md, DLLM2Rec section).

Usage: python benchmarks/rec_dllm2rec.py [--work DIR] [--rec-bench DIR | --teacher DIR --data DIR] [--epochs N]
       [--eval-users N] [--threads T] [--distill-args "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-latest-small"
KEYS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")


def run(cmd: list[str]) -> tuple[dict, float]:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout), time.perf_counter() - t0


def teacher_dirs(rec_bench: Path, work: Path, common: list[str]) -> tuple[Path, Path, str]:
    """(teacher dir, data dir, how the teacher was obtained)."""
    if (rec_bench / "llm30" / "rec.json").is_file() and (rec_bench / "data" / "data.json").is_file():
        return rec_bench / "llm30", rec_bench / "data", f"reused {rec_bench / 'llm30'}"
    data, teacher = work / "data", work / "llm30"
    if not (data / "data.json").is_file():
        run(["workbench", "rec", "prepare", str(DATA), "--out", str(data), "--overwrite", "--json"])
    cmd = ["workbench", "rec", "train", "llm", "--backbone", "smollm2-135m", "--data", str(data), "--out",
           str(teacher), "--epochs", "1", "--batch-size", "8", "--lr", "3e-4", "--max-users", "96", *common]
    if not (teacher / "rec.json").is_file():
        run(cmd)
    return teacher, data, " ".join(cmd)


def teacher_name(teacher: Path) -> str:
    """The teacher row's label: backbone, layers and, for an E4SRec-style teacher, where its item table came from."""
    doc = json.loads((teacher / "rec.json").read_text())
    layers = json.loads((teacher / "config.json").read_text()).get("num_hidden_layers")
    name = f"LLM teacher ({(doc.get('backbone') or {}).get('source', '?')}, {layers} layers"
    init = doc.get("item_init")
    if init:
        name += f", items from {init['kind']}{' (frozen)' if init.get('frozen') else ''}"
    return name + ")"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/dllm-bench"))
    ap.add_argument("--rec-bench", type=Path, default=Path("/tmp/rec-bench"))
    ap.add_argument("--epochs", default="30", help="student epochs (same for plain and distilled)")
    ap.add_argument("--eval-users", type=int, default=None, help="evaluate the first N users (default: all)")
    ap.add_argument("--distill-args", default="", help="extra `rec distill-to` options (default: the paper's)")
    ap.add_argument("--teacher", type=Path, default=None, help="an existing LLM recommender (needs --data)")
    ap.add_argument("--data", type=Path, default=None, help="the prepared data the --teacher was trained on")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every command")
    a = ap.parse_args()
    if (a.teacher is None) != (a.data is None):
        sys.exit("--teacher and --data go together")
    if a.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # inherited by every workbench command below
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    common = ["--overwrite", "--json", "--jobs-dir", str(w / "jobs")]
    if a.teacher is not None:
        teacher, data, teacher_how = a.teacher, a.data, f"given: {a.teacher}"
    else:
        teacher, data, teacher_how = teacher_dirs(a.rec_bench, w, common)
    d = ["--data", str(data)]
    train = ["--epochs", a.epochs, "--batch-size", "64"]
    runs = {teacher_name(teacher): None}
    for kind, name in (("sasrec", "SASRec"), ("gru4rec", "GRU4Rec")):
        runs[name] = ["workbench", "rec", "train", kind, *d, "--out", str(w / kind), *train, *common]
        runs[f"{name} + DLLM2Rec"] = ["workbench", "rec", "distill-to", kind, "--teacher", str(teacher), *d, "--out",
                                      str(w / f"{kind}-dllm2rec"), *shlex.split(a.distill_args), *train, *common]
    users = [] if a.eval_users is None else ["--max-users", str(a.eval_users)]
    load = os.getloadavg()
    rows = []
    for name, cmd in runs.items():
        if cmd is None:
            outdir, wall = str(teacher), None
        else:
            trained, wall = run(cmd)
            outdir = trained["output"]
        doc = json.loads((Path(outdir) / "rec.json").read_text())
        ev, _ = run(["workbench", "rec", "eval", outdir, *d, "--protocol", "full", "--protocol", "sampled-999",
                     *users, "--json"])
        rows.append({"name": name, "command": teacher_how if cmd is None else " ".join(cmd),
                     "train_wall_s": None if wall is None else round(wall, 1),
                     "epoch_seconds": doc["train"]["epoch_seconds"], "train_users": doc["train"]["train_users"],
                     "params": doc["params"], "dllm2rec": doc.get("dllm2rec"), "eval": ev})
        (w / "results.json").write_text(json.dumps({"load_before": load, "rows": rows}, indent=2))
    load_after = os.getloadavg()
    (w / "results.json").write_text(json.dumps({"load_before": load, "load_after": load_after, "rows": rows},
                                               indent=2))
    print(f"load average before {load[0]:.2f} / after {load_after[0]:.2f}; teacher: {teacher_how}\n")
    print("| model | params | train s/epoch (users) | infer s/1k users | " + " | ".join(
        f"full {k}" for k in KEYS) + " | " + " | ".join(f"s999 {k}" for k in KEYS) + " |")
    print("|---" * (4 + 2 * len(KEYS)) + "|")
    for r in rows:
        m, ep = r["eval"]["metrics"], r["epoch_seconds"]
        print(f"| {r['name']} | {r['params'] / 1e6:.3f}M | {sum(ep) / max(1, len(ep)):.1f} ({r['train_users']}) | "
              f"{r['eval']['seconds_per_1k_users']:.2f} | " + " | ".join(f"{m['full'][k]:.4f}" for k in KEYS)
              + " | " + " | ".join(f"{m['sampled-999'][k]:.4f}" for k in KEYS) + " |")


if __name__ == "__main__":
    main()
