"""Benchmark of importance scoring on the real demo model (SmolLM2-135M-Instruct), side by side in one run.

1. Speed: wall time of the combined scoring run (every fast method: gates, Taylor, activations, Wanda, block
   influence, sv / sv-act / sv-grad, magnitudes) divided by one plain forward+backward (all weights requiring
   grad, as in a training step) over the same calibration tokens. Target <= 1.5. The data pass and the SVD part
   are reported separately.
2. The ablation reference against the fast path, on a smaller calibration slice (ablation costs one forward per
   head): time of both, and Spearman rank correlation of head_grad / head_taylor / head_delta / head_act against
   head_ablate
   (all heads pooled, and the mean of per-layer correlations), and of layer_bi against layer_ablate.
3. Quality: WikiText-2 perplexity of the demo pruned to the target fraction of parameters by `plan suggest` with
   each method's scores (uniform, so the result loads with plain transformers; plus non-uniform plans), against
   weight-magnitude and random scores at the same size. No recovery training.

Calibration tokens are taken from the WikiText-2 test text AFTER the perplexity blocks, so no evaluated token is
ever used for scoring. Perplexity: surgery.metrics.perplexity when present (mean NLL over non-overlapping blocks,
exp'ed), else the same definition inline.

Run: python benchmarks/scoring.py [--model smollm2-135m] [--calib-tokens 8192] [--seq-len 256] [--batch-size 8]
     [--ablate-tokens 256] [--ppl-blocks 16] [--ppl-seq-len 1024] [--target 0.8] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from surgery.apply import apply_plan
from surgery.data import TokenBlocks, cut_blocks, tokenize_text
from surgery.fingerprint import tokens_fingerprint
from surgery.importance import ScoreFile, ScoreMeta, score_model
from surgery.importance.layout import model_layout
from surgery.loading import load_model
from surgery.estimate import count_params
from surgery.suggest import Target, suggest_plan

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (no ties expected in float scores)."""
    ra = torch.argsort(torch.argsort(a.double())).double()
    rb = torch.argsort(torch.argsort(b.double())).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def blocks_of(ids: torch.Tensor, source: str) -> TokenBlocks:
    return TokenBlocks(ids, source, tokens_fingerprint(ids), ids.numel())


@torch.inference_mode()
def perplexity(model, blocks: TokenBlocks) -> float:
    try:
        from surgery.metrics.perplexity import perplexity as ppl

        return ppl(model, blocks).perplexity
    except ImportError:  # the metrics module is not there: the same definition, inline
        nll, n = 0.0, 0
        for ids in blocks.batches(1):
            logits = model(input_ids=ids, use_cache=False).logits
            nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"))
            n += ids.shape[1] - 1
        return math.exp(nll / n)


def plain_fwd_bwd(model, batches) -> float:
    """One training-style forward+backward per batch (every parameter requires grad)."""
    for p in model.parameters():
        p.requires_grad_(True)
    start = time.perf_counter()
    for ids in batches:
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def timed_scores(model, batches, methods):
    """(scores, total seconds, seconds until the last batch of the data passes finished)."""
    marks = {}

    def progress(done, total):
        if done == total:
            marks["passes"] = time.perf_counter()

    start = time.perf_counter()
    scores = score_model(model, batches, methods, progress=progress)
    end = time.perf_counter()
    return scores, end - start, marks.get("passes", end) - start


def random_scores(model, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layout = model_layout(model)
    out = {}
    for s in layout.layers:
        out[f"{s.attn_path}/head_random"] = torch.rand(s.heads, generator=g)
        out[f"{s.mlp_path}/neuron_random"] = torch.rand(s.width, generator=g)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ablate-tokens", type=int, default=256)
    ap.add_argument("--ppl-blocks", type=int, default=16)
    ap.add_argument("--ppl-seq-len", type=int, default=1024)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--model", default="smollm2-135m", help="another source, e.g. to try the script on a tiny model")
    args = ap.parse_args()
    torch.manual_seed(0)

    loaded = load_model(args.model, dtype="float32")
    model, cfg = loaded.model, loaded.config_dict
    ids = tokenize_text(WIKI.read_text(encoding="utf-8"), loaded.tokenizer)
    n_eval = args.ppl_blocks * args.ppl_seq_len
    evals = blocks_of(cut_blocks(ids[:n_eval], args.ppl_seq_len), str(WIKI))
    calib = blocks_of(cut_blocks(ids[n_eval:], args.seq_len, args.calib_tokens), f"{WIKI} after {n_eval} tokens")
    batches = list(calib.batches(args.batch_size))
    threads = torch.get_num_threads()
    print(f"{args.model}, {threads} threads; calibration {calib.num_tokens} tokens (seq {args.seq_len}, batch "
          f"{args.batch_size}); perplexity on {args.ppl_blocks} x {args.ppl_seq_len} WikiText-2 test blocks")
    result: dict = {"settings": vars(args) | {"threads": threads, "json": None}}

    # 1. speed -------------------------------------------------------------------------------------------------
    plain = plain_fwd_bwd(model, batches)
    fast, fast_s, pass_s = timed_scores(model, batches, "fast")
    result["speed"] = {"plain_fwd_bwd_s": plain, "scoring_s": fast_s, "data_pass_s": pass_s,
                       "svd_and_rest_s": fast_s - pass_s, "ratio": fast_s / plain, "pass_ratio": pass_s / plain}
    print(f"\n[speed] plain fwd+bwd {plain:.1f}s; combined scoring (fast: {len(fast)} tensors) {fast_s:.1f}s = "
          f"data pass {pass_s:.1f}s + SVD etc. {fast_s - pass_s:.1f}s; ratio {fast_s / plain:.2f} "
          f"(data pass alone {pass_s / plain:.2f}); target <= 1.5")

    # 2. ablation reference ------------------------------------------------------------------------------------
    small = list(blocks_of(calib.ids[: max(1, args.ablate_tokens // args.seq_len)], "slice").batches(args.batch_size))
    ref_fast, ref_fast_s, _ = timed_scores(model, small, "head-grad,head-taylor,head-delta,head-act,layer-bi")
    ref, ref_s, _ = timed_scores(model, small, "head-ablate,layer-ablate")
    layout = model_layout(model)
    corr = {}
    for metric in ("head_grad", "head_taylor", "head_delta", "head_act"):
        pooled_a = torch.cat([ref_fast[f"{s.attn_path}/{metric}"] for s in layout.layers])
        pooled_b = torch.cat([ref[f"{s.attn_path}/head_ablate"] for s in layout.layers])
        per_layer = [spearman(ref_fast[f"{s.attn_path}/{metric}"], ref[f"{s.attn_path}/head_ablate"])
                     for s in layout.layers]
        corr[metric] = {"pooled": spearman(pooled_a, pooled_b), "per_layer_mean": sum(per_layer) / len(per_layer)}
    mp = layout.model_path
    corr["layer_bi"] = {"pooled": spearman(ref_fast[f"{mp}/layer_bi"], ref[f"{mp}/layer_ablate"])}
    result["ablation"] = {"tokens": sum(b.numel() for b in small), "fast_s": ref_fast_s, "ablate_s": ref_s,
                          "spearman": corr}
    print(f"\n[ablation reference] {result['ablation']['tokens']} tokens: ablation {ref_s:.1f}s vs fast path "
          f"{ref_fast_s:.1f}s ({ref_s / ref_fast_s:.0f}x)")
    for metric, c in corr.items():
        extra = f", per-layer mean {c['per_layer_mean']:.3f}" if "per_layer_mean" in c else ""
        target = "layer_ablate" if metric == "layer_bi" else "head_ablate"
        print(f"  spearman({metric}, {target}) = {c['pooled']:.3f} pooled{extra}")

    # 3. perplexity of pruned models ---------------------------------------------------------------------------
    meta = ScoreMeta(methods=["fast"], model_source="smollm2-135m", library_version="bench", tokens=calib.num_tokens)
    tensors = {**fast, **random_scores(model), **{k: v for k, v in ref.items() if k.endswith("head_ablate")}}
    scores = ScoreFile(meta, tensors)  # in memory only, so the extra "random" metric names are fine
    runs = [
        ("head-grad + neuron-taylor", {"heads": "head_grad", "neurons": "neuron_taylor"}, True),
        ("head-delta + neuron-taylor", {"heads": "head_delta", "neurons": "neuron_taylor"}, True),
        ("head-delta + neuron-delta", {"heads": "head_delta", "neurons": "neuron_delta"}, True),
        ("head-act + neuron-act", {"heads": "head_act", "neurons": "neuron_act"}, True),
        ("head-act + neuron-wanda", {"heads": "head_act", "neurons": "neuron_wanda"}, True),
        (f"head-ablate ({result['ablation']['tokens']} tok) + neuron-taylor",
         {"heads": "head_ablate", "neurons": "neuron_taylor"}, True),
        ("magnitude (baseline)", {"heads": "head_magnitude", "neurons": "neuron_magnitude"}, True),
        ("random (baseline)", {"heads": "head_random", "neurons": "neuron_random"}, True),
        ("head-grad + neuron-taylor, non-uniform", {"heads": "head_grad", "neurons": "neuron_taylor"}, False),
        ("head-delta + neuron-taylor, non-uniform", {"heads": "head_delta", "neurons": "neuron_taylor"}, False),
    ]
    base_ppl = perplexity(model, evals)
    print(f"\n[perplexity] original: {base_ppl:.2f} ({count_params(model):,} params)")
    table = [{"method": "original", "params": count_params(model), "perplexity": base_ppl}]
    for name, metrics, uniform in runs:
        s = suggest_plan(scores, cfg, Target(params=args.target), uniform=uniform, metrics=metrics)
        pruned = copy.deepcopy(model)
        apply_plan(pruned, s.plan)
        value = perplexity(pruned, evals)
        row = {"method": name, "uniform": uniform, "params": count_params(pruned), "perplexity": value,
               "summary": {k: sorted(set(v.values())) if isinstance(v, dict) else v for k, v in s.summary.items()}}
        table.append(row)
        print(f"  {name:48s} params {row['params']:,} ({row['params'] / table[0]['params']:.1%}) "
              f"ppl {value:,.1f}  per-layer removed: heads {row['summary']['heads_removed']}, "
              f"neurons {row['summary']['neurons_removed']}")
        del pruned
    result["perplexity"] = table
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
