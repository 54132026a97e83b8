"""Distillation methods side by side at one token budget, on the real demo model (SmolLM2-135M-Instruct).

From one pruned student (e.g. the 80% non-uniform plan's output), one real job per method (`run_job`, the code
path of `workbench distill --foreground`), same data, seed, steps, batch and learning rate:

    forward KL (kl), reverse KL (rkl), generalized JSD (jsd, beta 0.5), on-policy GKD (jsd + on_policy lambda),
    sequence-level KD (ce on the teacher's samples), cached top-k logits (kl from a teacher cache; the run that
    builds the cache, then a second run that only reads it)

Each output is evaluated on the first --eval-blocks x --eval-seq-len WikiText-2 test tokens (training text must be
disjoint from them: pass text taken after the evaluated blocks). Printed: perplexity, its ratio to the teacher's,
wall time, training tokens/s (median over steps) and, for the cache, its bytes per token and build time.

Run: python benchmarks/distill_methods.py --student DIR --data TRAIN.txt [--steps 8] [--seq-len 512]
     [--batch-size 2] [--eval-blocks 8] [--methods kl,rkl,jsd,on-policy,seq-kd,cache] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

WIKITEXT = Path(__file__).parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

METHODS = {
    "kl": ("forward KL", {"losses": {"kl": 1.0, "ce": 0.1}}),
    "rkl": ("reverse KL", {"losses": {"rkl": 1.0, "ce": 0.1}}),
    "jsd": ("JSD (beta 0.5)", {"losses": {"jsd": 1.0, "ce": 0.1}, "jsd_beta": 0.5}),
    "on-policy": ("on-policy GKD (jsd beta 0.5, lambda 0.5)",
                  {"losses": {"jsd": 1.0, "ce": 0.1}, "jsd_beta": 0.5, "on_policy": 0.5}),
    "seq-kd": ("sequence-level KD (ce on teacher samples)", {"losses": {"ce": 1.0}, "seq_kd": True}),
    "cache": ("cached top-64 logits (kl)", {"losses": {"kl": 1.0, "ce": 0.1}, "top_k": 64}),
}


def perplexity_of(source: str, blocks) -> float:
    from surgery.loading import load_model
    from surgery.metrics.perplexity import perplexity

    return perplexity(load_model(source).model, blocks, batch_size=1).perplexity


def run_method(name: str, over: dict, args, work: Path) -> dict:
    from surgery.distill.config import parse_config
    from surgery.jobs.worker import run_new_job

    doc = {"version": 1, "teacher": args.teacher, "student": args.student, "data": args.data,
           "max_tokens": args.steps * args.batch_size * args.seq_len, "temperature": args.temperature,
           "steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr,
           "gen_tokens": args.gen_tokens, "checkpoint_every": 10_000, "device": "cpu", "seed": 0, **over}
    job, code, events, wall = run_new_job(work / "jobs", parse_config(doc).to_json())
    if code != 0:
        raise SystemExit(f"{name}: job failed: {events[-1]}")
    steps = [e for e in events if e["event"] == "step"]
    start = next(e for e in events if e["event"] == "start")
    row = {"method": name, "job": str(job.path), "output": str(job.default_output), "wall_s": round(wall, 1),
           "train_s": round(steps[-1]["elapsed_s"], 1), "train_tokens": args.steps * args.batch_size * args.seq_len,
           "tokens_per_s": round(statistics.median(e["tokens_per_s"] for e in steps), 1),
           "loss_first_last": [round(steps[0]["losses"]["total"], 4), round(steps[-1]["losses"]["total"], 4)]}
    if start.get("teacher_cache"):
        row["cache_bytes_per_token"] = start["teacher_cache"]["bytes_per_token"]
        row["cache_bytes"] = start["teacher_cache"]["bytes"]
        said = {e.get("message", ""): e["time"] for e in events if e["event"] == "status"}
        begin = next((t for m, t in said.items() if m.startswith("building the teacher cache")), None)
        end = next((t for m, t in said.items() if m.startswith("teacher cache /")), None)
        row["cache_build_s"] = round(end - begin, 1) if begin and end else 0.0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--student", required=True)
    ap.add_argument("--data", required=True, help="training text, disjoint from the evaluated blocks")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from surgery.data import load_blocks
    from surgery.loading import load_tokenizer
    from surgery.sources import resolve_source

    work = args.work or Path(tempfile.mkdtemp(prefix="distill-methods-"))
    blocks = load_blocks(WIKITEXT, load_tokenizer(resolve_source(args.teacher)), args.eval_seq_len,
                         args.eval_blocks * args.eval_seq_len)
    print(f"eval: {blocks.num_blocks} x {blocks.seq_len} WikiText-2 test tokens ({blocks.fingerprint[:19]}...); "
          f"budget {args.steps} steps x {args.batch_size * args.seq_len} tokens; {args.threads} thread(s)",
          flush=True)
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "eval_data": blocks.describe(), "rows": []}
    result["teacher_ppl"] = perplexity_of(args.teacher, blocks)
    result["student_ppl"] = perplexity_of(args.student, blocks)
    base = result["teacher_ppl"]
    print(f"teacher {base:.2f}; student before {result['student_ppl']:.2f} ({result['student_ppl'] / base:.2f}x)",
          flush=True)
    for key in args.methods.split(","):
        label, over = METHODS[key]
        if key == "cache":
            over = {**over, "teacher_cache": str(work / "teacher-cache")}
        runs = [(label, over)] + ([(label + ", 2nd run from the cache", over)] if key == "cache" else [])
        first_output = None
        for name, o in runs:
            row = run_method(name, o, args, work)
            if first_output is None:
                row["perplexity"] = perplexity_of(row["output"], blocks)
                row["ratio"] = row["perplexity"] / base
                first_output = Path(row["output"])
            else:  # same cache, same seed: the weights must be the first run's, byte for byte
                same = all((first_output / f.name).read_bytes() == f.read_bytes()
                           for f in Path(row["output"]).glob("*.safetensors"))
                row["identical_to_first_run"] = same
            result["rows"].append(row)
            ppl = f"ppl {row['perplexity']:.2f} ({row['ratio']:.2f}x)" if "perplexity" in row else (
                f"weights identical to the first run: {row['identical_to_first_run']}")
            extra = (f"; cache {row['cache_bytes_per_token']} B/token, built in {row['cache_build_s']}s"
                     if "cache_bytes_per_token" in row else "")
            print(f"  {name:48s} {ppl}; wall {row['wall_s']}s (training {row['train_s']}s), "
                  f"{row['tokens_per_s']} tokens/s{extra}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
