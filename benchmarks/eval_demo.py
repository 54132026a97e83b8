"""Benchmark for surgery.metrics on the real demo model (SmolLM2-135M-Instruct) and a pruned copy, side by side.

1. The pruned model: `workbench apply` of a uniform weight-norm plan (one KV group = 3 of 9 query heads, and 347 of
   1536 MLP neurons per layer; `magnitude_plan` of benchmarks/apply_speed.py), about 20% of the parameters.
2. Perplexity on WikiText-2 raw test (../shared/data) at seq-len 2048, non-overlapping blocks (the calibration
   contract), on the first --blocks blocks (0: the whole split, 147 blocks).
3. Prefill latency (--prompt-len tokens) and decode tokens/s at batch 1 and --batch, with the two models measured
   in alternating rounds (original, pruned, original, ...) so that a shared machine's load changes hit both alike;
   ratios are per round, then the median (and spread) over rounds.
4. Peak memory of each model from `workbench eval --json` run in a fresh process (RSS high-water during its speed
   runs), so one model's memory never counts for the other.

Run: python benchmarks/eval_demo.py [--blocks 32] [--rounds 5] [--prompt-len 128] [--new-tokens 32] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from apply_speed import magnitude_plan  # noqa: E402 - a sibling script, not a package

from surgery.data import load_blocks  # noqa: E402
from surgery.inspect import inspect_model  # noqa: E402
from surgery.loading import load_model  # noqa: E402
from surgery.metrics.common import median_spread  # noqa: E402
from surgery.metrics.perplexity import perplexity  # noqa: E402
from surgery.metrics.speed import measure_speed  # noqa: E402
from surgery.sources import resolve_source  # noqa: E402
from workbench.cli import run as workbench  # noqa: E402

WIKITEXT = Path(__file__).parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def load() -> str:
    return "load avg " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def ppl_of(path, blocks, label: str) -> tuple[float, float]:
    model = load_model(str(path), dtype="float32").model
    t0 = time.perf_counter()

    def progress(ev):
        if ev.done and (ev.done % 8 == 0 or ev.done == ev.total):
            print(f"  {label}: {ev.done}/{ev.total} blocks, {time.perf_counter() - t0:.0f}s", flush=True)

    r = perplexity(model, blocks, progress=progress)
    return r.perplexity, time.perf_counter() - t0


def speed_rounds(paths: dict, args) -> dict:
    models = {name: load_model(str(p), dtype="float32").model for name, p in paths.items()}
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 49152, (args.batch, args.prompt_len), generator=g)
    rows: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "d1": [], "db": []} for n in models}
    for r in range(args.rounds + 1):  # round 0 is a warm-up for both, discarded
        for name, model in models.items():
            s = measure_speed(model, prompts, new_tokens=args.new_tokens, batch=args.batch, repeats=1, warmup=0)
            if r:
                rows[name]["prefill"].append(s.prefill_ms.median)
                rows[name]["d1"].append(s.decode_tps_1.median)
                rows[name]["db"].append(s.decode_tps_b.median)
        print(f"  speed round {r}/{args.rounds} done ({load()})", flush=True)
    return rows


def eval_memory(path, records: Path, args) -> float:
    cmd = ["workbench", "eval", str(path), "--repeats", "1", "--warmup", "1", "--new-tokens", str(args.new_tokens),
           "--speed-batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--dtype", "float32",
           "--threads", str(args.threads), "--records", str(records), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    speed = next(r for r in json.loads(out)["records"] if r["kind"] == "speed")
    return next(m["value"] for m in speed["metrics"] if m["name"] == "peak memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=32, help="first N blocks of 2048 tokens (0: whole split)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"command: python {' '.join(sys.argv)}\nthreads {args.threads}, {load()}", flush=True)

    src = resolve_source("smollm2-135m").path
    work = Path(tempfile.mkdtemp(prefix="wb-eval-bench-"))
    try:
        plan = work / "plan.json"
        plan.write_text(json.dumps(magnitude_plan(src)))
        code = workbench(["apply", str(plan), "--model", "smollm2-135m", "--out", str(work / "pruned"), "--json"])
        assert code == 0, "workbench apply failed"
        paths = {"original": src, "pruned": work / "pruned"}
        sizes = {n: inspect_model(p, context=args.seq_len) for n, p in paths.items()}
        print(f"pruned keeps {sizes['pruned'].params_total / sizes['original'].params_total:.1%} of the parameters",
              flush=True)

        loaded = load_model(str(src))
        blocks = load_blocks(WIKITEXT, loaded.tokenizer, args.seq_len, args.blocks * args.seq_len or None)
        del loaded
        print(f"data: {blocks.num_blocks} blocks x {blocks.seq_len} tokens ({blocks.fingerprint[:19]}...)", flush=True)
        ppl = {n: ppl_of(p, blocks, n) for n, p in paths.items()}

        rows = speed_rounds(paths, args)
        memory = {n: eval_memory(p, work / "records", args) for n, p in paths.items()}

        def ratio(key: str) -> tuple[float, float]:
            return median_spread([b / a for a, b in zip(rows["original"][key], rows["pruned"][key])])

        print("\n| metric | original | pruned | pruned / original |\n|---|---:|---:|---:|")
        o, p = sizes["original"], sizes["pruned"]
        print(f"| params | {o.params_total:,} | {p.params_total:,} | {p.params_total / o.params_total:.3f} |")
        print(f"| FLOPs/token @{args.seq_len} | {o.flops_per_token / 1e6:.1f}M | {p.flops_per_token / 1e6:.1f}M | "
              f"{p.flops_per_token / o.flops_per_token:.3f} |")
        print(f"| perplexity ({blocks.num_blocks} x {blocks.seq_len}) | {ppl['original'][0]:.2f} | "
              f"{ppl['pruned'][0]:,.2f} | {ppl['pruned'][0] / ppl['original'][0]:,.1f} |")
        for key, name, unit in (("prefill", f"prefill {args.prompt_len} tok", "ms"), ("d1", "decode b=1", "tok/s"),
                                ("db", f"decode b={args.batch}", "tok/s")):
            cells = [f"{m:,.1f} ±{s:,.1f} {unit}" for m, s in (median_spread(rows[n][key]) for n in paths)]
            r, rs = ratio(key)
            print(f"| {name} | {cells[0]} | {cells[1]} | {r:.3f} ±{rs:.3f} |")
        print(f"| peak memory (RSS) | {memory['original']:,.0f} MiB | {memory['pruned']:,.0f} MiB | "
              f"{memory['pruned'] / memory['original']:.3f} |")
        print(f"\nperplexity wall time: original {ppl['original'][1]:.0f}s, pruned {ppl['pruned'][1]:.0f}s; "
              f"{args.rounds} alternating speed rounds (median ± half range); {load()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
