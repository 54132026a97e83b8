"""Width, depth and the mix at 80% of the demo's parameters (issue 18), side by side.

Stages (each prints JSON lines; run them in order, `distill` between `cuts` and `measure`):

    # plans and cuts: width-only (prune_hidden by channel-norm), depth-only (drop_layers by layer-bi),
    # heads+neurons (non-uniform, head-grad + neuron-taylor), `plan suggest --axes`'s mix on gate scores (mix) and
    # on measured loss curves (measured: --only measured)
    nice -n 10 python benchmarks/axes_80.py cuts --train /tmp/d14/wiki_train.txt --work /tmp/ax80
    # the same redistillation budget for every cut (workbench distill, 2 at a time): see docs/benchmarks.md
    # perplexity on the first 4 x 2048 WikiText-2 test tokens and prefill / decode speed, all models in one run
    nice -n 10 python benchmarks/axes_80.py measure --work /tmp/ax80 DIR [DIR ...]
    # MoE: tiny random Qwen3-MoE / Mixtral, uniform expert cuts: exactness and what they save
    nice -n 10 python benchmarks/axes_80.py moe --work /tmp/ax80

Scores come from --calib-tokens tokens of --train (text disjoint from the evaluated blocks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
DEMO = "smollm2-135m"
TARGET = 0.8


def _params(config_dict: dict, plan) -> int:
    from surgery.estimate import estimate
    from surgery.resolve import resolve_plan
    from surgery.shapes import shape_from_config

    return estimate(config_dict, resolve_plan(plan, shape_from_config(config_dict))).params_after


def _closest(config_dict: dict, candidates: list[list[dict]], total: int) -> tuple[list[dict], int]:
    """The candidate plan (steps) whose parameter count is closest to TARGET x total."""
    from surgery.plan import parse_plan

    sized = [(abs(_params(config_dict, parse_plan({"version": 1, "steps": c})) - TARGET * total), c)
             for c in candidates]
    best = min(sized, key=lambda t: t[0])[1]
    return best, _params(config_dict, parse_plan({"version": 1, "steps": best}))


def width_steps(config_dict: dict, channel_scores: torch.Tensor, total: int) -> tuple[list[dict], int]:
    """prune_hidden of the lowest-scored channels, to the legal hidden size closest to 80% of the parameters."""
    hidden, heads = config_dict["hidden_size"], config_dict["num_attention_heads"]
    order = torch.argsort(channel_scores).tolist()
    # LlamaConfig needs num_attention_heads to divide hidden_size (KNOWN_TRAPS 2): only those sizes are legal
    sizes = [h for h in range(heads, hidden, heads)]
    candidates = [[{"op": "prune_hidden", "channels": sorted(order[: hidden - h])}] for h in sizes[-40:]]
    return _closest(config_dict, candidates, total)


def depth_steps(config_dict: dict, layer_scores: torch.Tensor, total: int) -> tuple[list[dict], int]:
    """drop_layers of the lowest-scored layers, the count closest to 80% of the parameters."""
    order = torch.argsort(layer_scores).tolist()
    candidates = [[{"op": "drop_layers", "layers": sorted(order[:k])}] for k in range(1, len(order))]
    return _closest(config_dict, candidates, total)


def cuts(args) -> None:
    from surgery.data import load_blocks
    from surgery.importance import load_scores, save_scores, score_source
    from surgery.importance.width import channel_norm_scores
    from surgery.loading import load_model
    from surgery.pipeline import apply_to_source
    from surgery.plan import parse_plan
    from surgery.suggest import Target, suggest_for_source

    from surgery.loading import read_config
    from surgery.sources import resolve_source

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only.split(",")) if args.only else {"width", "depth", "heads+neurons", "mix"}
    config_dict = read_config(resolve_source(DEMO))
    total = None
    scores_path = work / "scores.safetensors"
    if wanted & {"depth", "heads+neurons", "measured"} and not scores_path.exists():  # layer-bi; head-grad + neuron-taylor
        save_scores(scores_path, score_source(DEMO, str(args.train), "head-grad,neuron-taylor,layer-bi",
                                              tokens=args.calib_tokens, seq_len=256, batch_size=8))
    plans = {}
    if "width" in wanted:
        demo = load_model(DEMO)
        total = sum(p.numel() for p in demo.model.parameters())
        blocks = load_blocks(args.train, demo.tokenizer, 256, args.calib_tokens)
        plans["width"], _ = width_steps(config_dict, channel_norm_scores(demo.model, blocks.batches(8)), total)
        del demo
    if total is None:
        from surgery.estimate import estimate
        from surgery.resolve import resolve_plan
        from surgery.shapes import shape_from_config

        total = estimate(config_dict, resolve_plan(parse_plan({"version": 1, "steps": []}),
                                                   shape_from_config(config_dict))).params_before
    if "depth" in wanted:
        tensors = load_scores(scores_path, force=True).tensors
        layer_scores = next(v for k, v in tensors.items() if k.endswith("/layer_bi"))
        plans["depth"], _ = depth_steps(config_dict, layer_scores.flatten(), total)
    if "heads+neurons" in wanted:
        hn = suggest_for_source(DEMO, [scores_path], Target(params=TARGET), uniform=False)
        plans["heads+neurons"] = [s.model_dump(exclude_none=True) for s in hn.plan.steps]
    if "mix" in wanted:  # `plan suggest --axes hidden,layers,heads,neurons` (issue 18)
        gates_path = work / "scores_gates.safetensors"
        if not gates_path.exists():
            # a mix needs loss-estimate (gate) scores on every axis: layer-bi and channel-norm are magnitudes
            save_scores(gates_path, score_source(DEMO, str(args.train), "head-grad,neuron-taylor,layer-grad,"
                                                 "channel-taylor", tokens=args.mix_calib_tokens or args.calib_tokens,
                                                 seq_len=256, batch_size=8))
        target = Target(params=TARGET, axes=("hidden", "layers", "heads", "neurons"))
        mix = suggest_for_source(DEMO, [gates_path], target, uniform=False)
        plans["mix"] = [s.model_dump(exclude_none=True) for s in mix.plan.steps]
        print(json.dumps({"mix_summary": mix.summary}, default=str), flush=True)
    if "measured" in wanted:  # `plan suggest --axes hidden,layers,heads,neurons --data`: measured loss curves
        from surgery.importance.measured import suggest_measured_for_source

        norm_path = work / "scores_norm.safetensors"  # channel-norm: hidden's own ranking (same tokens as scores)
        if not norm_path.exists():
            save_scores(norm_path, score_source(DEMO, str(args.train), "channel-norm", tokens=args.calib_tokens,
                                                seq_len=256, batch_size=8))
        target = Target(params=TARGET, axes=("hidden", "layers", "heads", "neurons"))
        started = time.time()
        s = suggest_measured_for_source(DEMO, [scores_path, norm_path], target, str(args.train),
                                        tokens=args.measure_tokens, seq_len=256, uniform=False,
                                        progress=lambda m: print(json.dumps({"progress": m, "s": round(
                                            time.time() - started)}), flush=True))
        plans["measured"] = [st.model_dump(exclude_none=True) for st in s.plan.steps]
        print(json.dumps({"measured_summary": s.summary, "allocation": s.plan.provenance["allocation"],
                          "wall_s": round(time.time() - started)}, default=str), flush=True)
    for name, steps in plans.items():
        plan = parse_plan({"version": 1, "steps": steps})
        out = work / f"cut_{name.replace('+', '_')}"
        (work / f"plan_{name.replace('+', '_')}.json").write_text(plan.to_json())
        shutil.rmtree(out, ignore_errors=True)
        apply_to_source(plan, out, DEMO)
        print(json.dumps({"plan": name, "params": _params(config_dict, plan), "of": total,
                          "fraction": round(_params(config_dict, plan) / total, 4), "out": str(out),
                          "steps": len(steps)}), flush=True)


def measure(args) -> None:
    from surgery.data import load_blocks
    from surgery.loading import load_model
    from surgery.metrics.perplexity import perplexity
    from surgery.metrics.speed import measure_speed

    sources = [DEMO, *args.models]
    models = {s: load_model(s, dtype="float32") for s in sources}
    blocks = None if args.no_ppl else load_blocks(args.wiki, models[DEMO].tokenizer, 2048, args.eval_tokens)
    vocab = int(models[DEMO].model.get_input_embeddings().weight.shape[0])
    prompts = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(0))
    rows = {s: {"model": s, "params": sum(p.numel() for p in m.model.parameters())} for s, m in models.items()}
    if not args.no_ppl:
        for s, m in models.items():
            if args.ppl_only and s not in args.ppl_only.split(","):
                continue
            rows[s]["ppl"] = perplexity(m.model, blocks).perplexity
            print(json.dumps(rows[s]), flush=True)
    if args.no_speed:
        print(json.dumps(list(rows.values()), indent=1), flush=True)
        return
    # speed interleaved round by round, so a change of machine load hits every model alike
    # CPU seconds of one whole speed run (the same work for every model) is the like-for-like figure on a shared
    # machine, where wall times follow the other processes more than the model
    samples: dict[str, dict[str, list[float]]] = {
        s: {"prefill_ms": [], "decode1": [], "decode4": [], "cpu_s": []} for s in sources}
    for _ in range(args.rounds):
        for s, m in models.items():
            cpu = time.process_time()
            r = measure_speed(m.model, prompts, new_tokens=16, batch=4, repeats=1, warmup=1)
            samples[s]["cpu_s"].append(time.process_time() - cpu)
            samples[s]["prefill_ms"].append(r.prefill_ms.median)
            samples[s]["decode1"].append(r.decode_tps_1.median)
            samples[s]["decode4"].append(r.decode_tps_b.median)
    base = samples[DEMO]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    for s in sources:
        x = samples[s]
        rows[s].update(prefill_128_ms=med(x["prefill_ms"]), decode_b1_tps=med(x["decode1"]),
                       decode_b4_tps=med(x["decode4"]),
                       prefill_speedup=med(base["prefill_ms"]) / med(x["prefill_ms"]),
                       decode_b1_speedup=med(x["decode1"]) / med(base["decode1"]),
                       decode_b4_speedup=med(x["decode4"]) / med(base["decode4"]),
                       speed_run_cpu_s=med(x["cpu_s"]), cpu_speedup=med(base["cpu_s"]) / med(x["cpu_s"]))
    print(json.dumps(list(rows.values()), indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(list(rows.values()), indent=1) + "\n")


def moe_table(args) -> None:
    """Tiny random Qwen3-MoE / Mixtral (no real small MoE is obtainable here): uniform expert cuts, exactness
    against the masked-router original (tests/test_prune_experts.py's oracle) and through llama.cpp, and what the
    cut saves (parameters, safetensors bytes, GGUF f16 bytes)."""
    import sys

    import numpy as np
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    from surgery.apply import apply_plan
    from surgery.export import save_model_dir
    from surgery.export.gguf import write_gguf
    from surgery.plan import parse_plan

    sys.path.insert(0, str(ROOT / "tests"))  # the test suite's oracle and tiny tokenizer, not a second copy
    from llama_cpp_helpers import open_llama
    from test_prune_experts import masked_router
    from tiny_models import tiny_tokenizer

    common = dict(vocab_size=128, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.1)
    configs = {"qwen3_moe": lambda: Qwen3MoeConfig(**common, intermediate_size=1024, moe_intermediate_size=512,
                                                   num_experts=8, norm_topk_prob=True),
               "mixtral": lambda: MixtralConfig(**common, intermediate_size=512, num_local_experts=8)}
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    work = args.work / "moe"
    for family, make in configs.items():
        torch.manual_seed(0)
        original = AutoModelForCausalLM.from_config(make(), attn_implementation="eager").eval()
        with torch.no_grad():  # which experts a layer routes to least on these tokens: removed first
            counts = []
            hooks = [layer.mlp.gate.register_forward_hook(
                lambda m, a, out, c=counts: c.append(torch.bincount(out[2].flatten(), minlength=8)))
                for layer in original.model.layers]
            original(ids)
            for h in hooks:
                h.remove()
        for keep in (8, 6, 4):
            removed = {i: sorted(torch.argsort(c)[: 8 - keep].tolist()) for i, c in enumerate(counts)}
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(make(), attn_implementation="eager").eval()
            steps = [{"op": "prune_experts", "layer": i, "experts": r} for i, r in removed.items() if r]
            pruned, _ = apply_plan(model, parse_plan({"version": 1, "steps": steps}))
            torch.manual_seed(0)
            oracle = AutoModelForCausalLM.from_config(make(), attn_implementation="eager").eval()
            masked_router(oracle, removed, normalise=True)  # both families renormalise the top-k here
            with torch.no_grad():
                got, want = pruned(ids).logits, oracle(ids).logits
            out = work / f"{family}-{keep}"
            shutil.rmtree(out, ignore_errors=True)
            save_model_dir(pruned, out, tokenizer=tiny_tokenizer(), manifest={"version": 1})
            gguf = write_gguf(pruned, tiny_tokenizer(), out.with_suffix(".gguf"), dtype="f16", overwrite=True)
            f32 = write_gguf(pruned, tiny_tokenizer(), out.with_suffix(".f32.gguf"), dtype="f32", overwrite=True)
            llm = open_llama(f32.out, n_ctx=256, n_threads=1)
            llm.eval(ids[0].tolist())
            cpp = np.array(llm.scores[: ids.shape[1]])
            llm.close()
            row = {"family": family, "experts": keep, "params": sum(p.numel() for p in pruned.parameters()),
                   "safetensors_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
                   "gguf_f16_bytes": gguf.file_bytes, "architecture": gguf.architecture,
                   "oracle_max_abs_diff": float((got - want).abs().max()),
                   "llama_cpp_f32_max_abs_diff": float(np.abs(cpp - got[0].numpy()).max()),
                   "max_abs_logit": float(got.abs().max())}
            print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="stage", required=True)
    c = sub.add_parser("cuts")
    c.add_argument("--train", type=Path, required=True, help="calibration text, disjoint from the evaluated blocks")
    c.add_argument("--calib-tokens", type=int, default=8192)
    c.add_argument("--work", type=Path, default=Path("/tmp/ax80"))
    c.add_argument("--only", help="comma-separated plan names to (re)apply, e.g. mix")
    c.add_argument("--measure-tokens", type=int, default=4096, help="calibration tokens of the measured mix's loss "
                   "curves (the first of --train)")
    c.add_argument("--mix-calib-tokens", type=int, help="calibration tokens of the mix's gate scores (default: "
                   "--calib-tokens)")
    m = sub.add_parser("measure")
    m.add_argument("models", nargs="+")
    m.add_argument("--work", type=Path, default=Path("/tmp/ax80"))
    m.add_argument("--eval-tokens", type=int, default=8192)
    m.add_argument("--rounds", type=int, default=3, help="speed rounds (each model once per round)")
    m.add_argument("--no-ppl", action="store_true")
    m.add_argument("--no-speed", action="store_true")
    m.add_argument("--ppl-only", help="comma-separated sources whose perplexity is measured (default: all)")
    m.add_argument("--json", type=Path)
    m.add_argument("--wiki", type=Path, default=WIKI, help="WikiText-2 raw test (the evaluated blocks)")
    e = sub.add_parser("moe")
    e.add_argument("--work", type=Path, default=Path("/tmp/ax80"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"cuts": cuts, "measure": measure, "moe": moe_table}[args.stage](args)


if __name__ == "__main__":
    main()
