"""What serving on vLLM costs an 80% plan of the demo: padding at export time vs `plan suggest --serve vllm`.

Side by side in one run, from one score file: the uniform plan, the free non-uniform plan and the non-uniform plan
allocated with `--serve vllm` (no head/KV cuts, MLP widths in 256-neuron blocks), each at --target-params 0.8:
parameters after pruning, parameters and FLOPs/token as the vLLM export serves them (after its zero padding),
and WikiText-2 test perplexity (the first --blocks x 2048 tokens, non-overlapping, no recovery training).

    nice -n 10 python benchmarks/vllm_serve_plans.py --scores SCORES.safetensors --work /tmp/vsp --blocks 16
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
DEMO = "smollm2-135m"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scores", required=True, help="a demo score file with head-grad and neuron-taylor")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vsp"))
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from surgery.data import load_blocks
    from surgery.estimate import linear_flops
    from surgery.export.vllm import export_vllm
    from surgery.loading import load_model
    from surgery.metrics.perplexity import perplexity
    from surgery.pipeline import apply_to_source
    from surgery.suggest import Target, suggest_for_source

    args.work.mkdir(parents=True, exist_ok=True)
    original = load_model(DEMO)
    blocks = load_blocks(WIKI, original.tokenizer, 2048, args.blocks * 2048)
    base_flops = linear_flops(original.model)
    rows = [{"plan": "original", "params": sum(p.numel() for p in original.model.parameters()),
             "ppl": perplexity(original.model, blocks).perplexity}]
    del original
    for name, uniform, serve in (("uniform", True, None), ("non-uniform", False, None),
                                 ("non-uniform --serve vllm", False, "vllm")):
        s = suggest_for_source(DEMO, [args.scores], Target(params=0.8, serve=serve), uniform=uniform)
        out = args.work / name.replace(" ", "_").replace("--", "")
        shutil.rmtree(out, ignore_errors=True)
        apply_to_source(s.plan, out)
        report = export_vllm(str(out), out.with_name(out.name + "-vllm"), dtype="float32", overwrite=True)
        pruned = load_model(str(out)).model
        row = {"plan": name, "params": s.params_after, "vllm_params": report.params,
               "vllm_params_added": report.params_added,
               "flops_ratio": linear_flops(pruned) / base_flops,
               "vllm_flops_ratio": (linear_flops(pruned) + report.flops_added) / base_flops,
               "ppl": perplexity(pruned, blocks).perplexity}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
