"""Recovery without training on the real demo model: cut only, + reconstruction, + whitened low rank, at one size.

1. Plans: `plan suggest --target-params T` from one score file (uniform and --non-uniform; docs/benchmarks.md
   "Importance scoring" says which metrics are best: the suggest defaults), then variants of each:
   - cut only;
   - + reconstruct (inputs from the pruned prefix, and from the original model), calibrated on WikiText-2 test
     text AFTER the evaluated blocks, and on tiny-shakespeare;
   - whitened low rank where it pays: attention Linears factorised (--low-rank attn --rank-keep K, whitened vs
     plain SVD) with the MLP pruned to the same total size, then reconstruct.
2. Each variant is applied in memory to a copy of the loaded model (the data stage timed on its own) and evaluated:
   perplexity on the first --eval-blocks blocks of --eval-seq-len WikiText-2 test tokens (surgery.metrics), the
   same tokens for every row; the unpruned model is evaluated on them too, so every ratio is measured in one run.
3. Plans are written to --out-dir (plan_<name>.json) so `workbench apply` replays them; --replay NAME applies one
   twice through the CLI and compares the safetensors bytes.

Run: nice -n 10 python benchmarks/recovery.py --scores S.safetensors --calib /tmp/recon/wiki_after_eval.txt
     [--eval-blocks 32] [--eval-seq-len 2048] [--calib-tokens 8192] [--threads 1] [--only NAME,NAME]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from surgery.apply import apply_resolution
from surgery.data import load_blocks
from surgery.estimate import count_params, meta_model
from surgery.importance.layout import model_layout
from surgery.importance.ranks import selected_linears
from surgery.loading import load_model
from surgery.metrics.perplexity import perplexity
from surgery.plan import Reconstruct
from surgery.reconstruct import calibrate_plan, check_enough_tokens, run_data_steps
from surgery.resolve import resolve_plan
from surgery.shapes import shape_from_config
from surgery.suggest import Target, suggest_for_source

DATA = Path(__file__).parents[2] / "shared" / "data"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"


def load() -> str:
    return "load avg " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def variants(args) -> dict[str, tuple]:
    """name -> (layout, low-rank spec or None, rank method, calibration file or None, reconstruct inputs or None,
    ridge)."""
    wiki, shake, r = args.calib, str(SHAKESPEARE), args.ridge
    rows = {}
    for layout in ("uniform", "non-uniform"):
        rows[f"{layout}/cut"] = (layout, None, None, None, None, r)
        rows[f"{layout}/recon-pruned"] = (layout, None, None, wiki, "pruned", r)
        rows[f"{layout}/recon-original"] = (layout, None, None, wiki, "original", r)
        rows[f"{layout}/recon-pruned-shakespeare"] = (layout, None, None, shake, "pruned", r)
        rows[f"{layout}/recon-original-shakespeare"] = (layout, None, None, shake, "original", r)
        for other in (0.01, 1.0):
            rows[f"{layout}/recon-pruned-ridge{other:g}"] = (layout, None, None, wiki, "pruned", other)
    for method in ("svd", "whitened"):
        rows[f"lowrank-attn-{method}/cut"] = ("non-uniform", "attn", method, wiki if method != "svd" else None,
                                              None, r)
        rows[f"lowrank-attn-{method}/recon-pruned"] = ("non-uniform", "attn", method, wiki, "pruned", r)
    rows["lowrank-attn-asvd/cut"] = ("non-uniform", "attn", "asvd", wiki, None, r)
    for method in ("svd", "whitened", "asvd"):
        rows[f"lowrank-attn-{method}/recon-original"] = ("non-uniform", "attn", method, wiki, "original", r)
        # ranks from sv-grad (--scores must hold sv and sv_grad), as many attention parameters as the energy choice
        rows[f"lowrank-attn-svgrad-{method}/cut"] = ("non-uniform", "attn@sv-grad", method,
                                                     wiki if method != "svd" else None, None, r)
        # low rank alone meets the target: sv-grad picks among every attention and MLP Linear, nothing is pruned
        rows[f"lowrank-all-svgrad-{method}/cut"] = ("non-uniform", "attn,mlp@sv-grad-target", method,
                                                    wiki if method != "svd" else None, None, r)
    rows["lowrank-attn-svgrad-whitened/recon-original"] = ("non-uniform", "attn@sv-grad", "whitened", wiki,
                                                           "original", r)
    return rows


def low_rank_target(args, low_rank: str, cache: dict) -> Target:
    """The Target of a low-rank row. "attn@sv-grad": ranks allocated by sv-grad for the attention parameters the
    energy choice (--rank-keep) removes, so the two rank choices are compared at equal parameters."""
    name, _, metric = low_rank.partition("@")
    if not metric:
        return Target(params=args.target, low_rank=(name,), rank_keep=args.rank_keep)
    if metric == "sv-grad-target":  # with metrics {"ranks": "sv_grad"} (build_plan)
        return Target(params=args.target, low_rank=tuple(name.split(",")))
    energy = suggest_for_source(args.model, args.scores, low_rank_target(args, name, cache), uniform=False,
                                force=len(args.scores) > 1)
    ranks = energy.summary["low_rank"]
    layout = model_layout(meta_model(args.config))
    shapes = {p: (o, i) for p, _, o, i in selected_linears(layout, layout.layers, (name,))}
    total = sum(o * i for o, i in shapes.values())
    removed = sum(shapes[p][0] * shapes[p][1] - r * sum(shapes[p]) for p, r in ranks.items())
    print(f"{low_rank}: the energy choice (keep {args.rank_keep}) removes {removed:,} of {total:,} {name} parameters",
          flush=True)
    return Target(params=args.target, low_rank=(name,), rank_params=1 - removed / total)


def build_plan(args, spec: tuple, tokenizer, config: dict, cache: dict):
    layout, low_rank, method, calib, inputs, ridge = spec
    key = (layout, low_rank)
    if key not in cache:
        target = low_rank_target(args, low_rank, cache) if low_rank else Target(params=args.target)
        # the sv file (data-free) has no data fingerprint to match the data-driven scores': merged with force
        metrics = {"ranks": "sv_grad"} if low_rank and "@sv-grad" in low_rank else None
        cache[key] = suggest_for_source(args.model, args.scores, target, uniform=layout == "uniform",
                                        force=len(args.scores) > 1, metrics=metrics).plan
    plan = cache[key]
    if calib is None:
        return plan
    step = Reconstruct(op="reconstruct", inputs=inputs, ridge=ridge) if inputs else None
    return calibrate_plan(plan, config, tokenizer, calib, tokens=args.calib_tokens, seq_len=args.seq_len,
                          reconstruct=step, rank_method=method if low_rank else None)


def evaluate(model, blocks, label: str) -> tuple[float, float]:
    t0 = time.perf_counter()

    def progress(ev):
        if ev.done and (ev.done % 8 == 0 or ev.done == ev.total):
            print(f"    {label}: {ev.done}/{ev.total} blocks, {time.perf_counter() - t0:.0f}s", flush=True)

    r = perplexity(model, blocks, progress=progress)
    return r.perplexity, time.perf_counter() - t0


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replay(plan_path: Path, args) -> None:
    """`workbench apply` the plan twice into fresh directories and compare the weights byte for byte."""
    digests, times = [], []
    for n in (1, 2):
        out = args.out_dir / f"replay{n}"
        t0 = time.perf_counter()
        subprocess.run(["workbench", "apply", str(plan_path), "--out", str(out), "--overwrite"], check=True)
        times.append(time.perf_counter() - t0)
        digests.append(sorted((p.name, sha(p)) for p in out.glob("*.safetensors")))
    print(f"replay {plan_path.name}: apply {times[0]:.0f}s / {times[1]:.0f}s; identical safetensors: "
          f"{digests[0] == digests[1]} ({digests[0][0][1][:16]}...)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scores", required=True, nargs="+", help="score files (add an sv file for low-rank rows)")
    ap.add_argument("--calib", required=True, help="calibration text disjoint from the evaluated blocks")
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--rank-keep", type=float, default=0.8)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ridge", type=float, default=0.1)
    ap.add_argument("--skip-baseline", action="store_true", help="do not evaluate the unpruned model (another "
                    "run does, on the same tokens): ratios print as nan")
    ap.add_argument("--eval-blocks", type=int, default=32)
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/recon"))
    ap.add_argument("--replay", default="", help="variant whose plan is applied twice via the CLI at the end")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    loaded = load_model(args.model, dtype="float32")
    base_model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.model.config.to_dict()
    args.config = config
    eval_blocks = load_blocks(WIKITEXT, tokenizer, args.eval_seq_len, args.eval_blocks * args.eval_seq_len)
    print(f"{args.model}, {args.threads} thread(s), {load()}; eval {eval_blocks.num_blocks} x {eval_blocks.seq_len} "
          f"tokens ({eval_blocks.fingerprint[:19]}...); calibration {args.calib_tokens} tokens, seq {args.seq_len}, "
          f"ridge {args.ridge}", flush=True)
    results = {}
    ppl0, t_eval = (float("nan"), 0.0) if args.skip_baseline else evaluate(base_model, eval_blocks, "unpruned")
    results["unpruned"] = {"ppl": ppl0, "eval_s": t_eval, "params": count_params(base_model)}
    print(f"unpruned: ppl {ppl0:.2f} ({t_eval:.0f}s)", flush=True)

    cache: dict = {}
    rows = variants(args)
    only = [n for n in args.only.split(",") if n]
    for name, spec in rows.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        plan = build_plan(args, spec, tokenizer, config, cache)
        t_plan = time.perf_counter() - t0
        path = args.out_dir / f"plan_{name.replace('/', '_')}.json"
        plan.save(path)
        resolution = resolve_plan(plan, shape_from_config(config))
        model = copy.deepcopy(base_model)
        t0 = time.perf_counter()
        apply_resolution(model, resolution)
        t_cut = time.perf_counter() - t0
        t_data = 0.0
        report = None
        if resolution.needs_data:
            cal = plan.calibration
            blocks = load_blocks(cal.source, tokenizer, cal.seq_len, cal.tokens)
            check_enough_tokens(resolution, blocks)
            t0 = time.perf_counter()
            report = run_data_steps(base_model, model, resolution, blocks)
            t_data = time.perf_counter() - t0
        ppl, t_eval = evaluate(model, eval_blocks, name)
        params = count_params(model)
        kept = params / results["unpruned"]["params"]
        results[name] = {"ppl": ppl, "ratio": ppl / ppl0, "params": params, "kept": kept, "plan_s": t_plan,
                         "cut_s": t_cut, "data_s": t_data, "eval_s": t_eval, "plan": str(path)}
        if report is not None:
            fits = report.fits
            results[name]["refits"] = len(fits)
            cut_error = sum(f.error_cut for f in fits)
            results[name]["refit_error"] = sum(f.error_fit for f in fits) / cut_error if fits else None
        print(f"{name}: ppl {ppl:.2f} = {ppl / ppl0:.2f}x, params {params:,} ({kept:.1%}); "
              f"plan {t_plan:.0f}s, cut {t_cut:.1f}s, data stage {t_data:.0f}s, eval {t_eval:.0f}s; {load()}",
              flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        del model
    if args.replay:
        replay(args.out_dir / f"plan_{args.replay.replace('/', '_')}.json", args)


if __name__ == "__main__":
    sys.exit(main())
