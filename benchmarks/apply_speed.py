"""Benchmark for the surgery core, on the real demo model (SmolLM2-135M-Instruct), side by side in one run.

1. `apply` of a plan removing ~20% of the parameters, against a plain `from_pretrained` + `save_pretrained` of the
   same model (ratio; target <= 1.2).
2. Prefill latency and decode tokens/s of the pruned model against the original, compared with the ideal speed-up
   that the FLOP reduction predicts (target: >= 90% of the ideal).

The plan is uniform (same cut in every layer, so the output loads with plain transformers): one KV group (3 of 9
query heads) and 347 of 1536 MLP neurons per layer, chosen by weight norm (speed does not depend on which).

Run: python benchmarks/apply_speed.py [--repeats 5] [--prompt 512] [--new-tokens 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from surgery.inspect import inspect_model
from surgery.pipeline import apply_to_source
from surgery.plan import parse_plan
from surgery.sources import resolve_source


def magnitude_plan(model_dir: Path, drop_groups: int = 1, drop_neurons: int = 347) -> dict:
    """A uniform plan: per layer the weakest KV group(s) and the weakest neurons by weight norm."""
    from safetensors import safe_open

    steps = []
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        cfg = json.loads((model_dir / "config.json").read_text())
        hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            k = f.get_tensor(p + "self_attn.k_proj.weight").view(cfg["num_key_value_heads"], hd, -1)
            groups = k.norm(dim=(1, 2)).argsort()[:drop_groups].tolist()
            down = f.get_tensor(p + "mlp.down_proj.weight")
            neurons = down.norm(dim=0).argsort()[:drop_neurons].tolist()
            steps.append({"op": "prune_kv_groups", "layer": i, "groups": sorted(groups)})
            steps.append({"op": "prune_neurons", "layer": i, "neurons": sorted(neurons)})
    return {"version": 1, "steps": steps, "provenance": {"how": "weight-norm, benchmarks/apply_speed.py"}}


def median_spread(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), (max(samples) - min(samples)) / 2


def time_apply_vs_plain(src: Path, plan, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    apply_s, plain_s = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
            model.save_pretrained(Path(tmp) / "plain")
            AutoTokenizer.from_pretrained(src).save_pretrained(Path(tmp) / "plain")
            plain_s.append(time.perf_counter() - t)
            del model
            t = time.perf_counter()
            apply_to_source(plan, Path(tmp) / "pruned", str(src))
            apply_s.append(time.perf_counter() - t)
    a, a_sd = median_spread(apply_s)
    p, p_sd = median_spread(plain_s)
    return {"apply_s": a, "apply_spread": a_sd, "plain_s": p, "plain_spread": p_sd, "ratio": a / p}


@torch.inference_mode()
def speed(model, prompt_len: int, new_tokens: int, repeats: int, device: str) -> dict:
    ids = torch.randint(100, 40000, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    model(ids)  # warm-up, excluded
    prefill = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        model(ids)
        sync()
        prefill.append(time.perf_counter() - t)
    model.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
    decode = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        model.generate(ids[:, :16], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync()
        decode.append(new_tokens / (time.perf_counter() - t))
    pm, ps = median_spread(prefill)
    dm, ds = median_spread(decode)
    return {"prefill_ms": pm * 1e3, "prefill_spread_ms": ps * 1e3, "decode_tok_s": dm, "decode_spread": ds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    src = resolve_source("smollm2-135m").path
    plan = parse_plan(magnitude_plan(src))
    work = Path(tempfile.mkdtemp(prefix="wb-bench-"))
    try:
        result = apply_to_source(plan, work / "pruned", str(src))
        before, after = result.manifest["params"]["before"], result.manifest["params"]["after"]
        print(f"plan removes {1 - after / before:.1%} of parameters ({before:,} -> {after:,}); "
              f"output loads with {result.manifest['output']['loadable_with']}")

        timing = time_apply_vs_plain(src, plan, max(3, args.repeats // 2))
        print(f"apply {timing['apply_s']:.2f}s ±{timing['apply_spread']:.2f} vs plain load+save "
              f"{timing['plain_s']:.2f}s ±{timing['plain_spread']:.2f}: ratio {timing['ratio']:.2f} (target <= 1.2)")

        flops = {}
        for name, path in (("original", src), ("pruned", work / "pruned")):
            flops[name] = {
                ctx: inspect_model(path, context=ctx).flops_per_token for ctx in (args.prompt // 2, 16 + args.new_tokens)
            }
        rows = {}
        for name, path in (("original", src), ("pruned", work / "pruned")):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
            rows[name] = speed(model, args.prompt, args.new_tokens, args.repeats, args.device)
            del model
        # ideal speed-up = FLOP ratio; prefill averaged over the prompt (mean context prompt/2), decode at its context
        ideal_prefill = flops["original"][args.prompt // 2] / flops["pruned"][args.prompt // 2]
        ideal_decode = flops["original"][16 + args.new_tokens] / flops["pruned"][16 + args.new_tokens]
        got_prefill = rows["original"]["prefill_ms"] / rows["pruned"]["prefill_ms"]
        got_decode = rows["pruned"]["decode_tok_s"] / rows["original"]["decode_tok_s"]
        for name, r in rows.items():
            print(f"{name:9s} prefill({args.prompt}) {r['prefill_ms']:.1f} ms ±{r['prefill_spread_ms']:.1f}   "
                  f"decode b=1 {r['decode_tok_s']:.1f} tok/s ±{r['decode_spread']:.1f}")
        print(f"prefill speed-up {got_prefill:.3f} vs ideal {ideal_prefill:.3f}: "
              f"{(got_prefill - 1) / (ideal_prefill - 1):.0%} of the ideal gain, "
              f"{got_prefill / ideal_prefill:.0%} of the ideal speed")
        print(f"decode  speed-up {got_decode:.3f} vs ideal {ideal_decode:.3f}: "
              f"{(got_decode - 1) / (ideal_decode - 1):.0%} of the ideal gain, "
              f"{got_decode / ideal_decode:.0%} of the ideal speed")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
