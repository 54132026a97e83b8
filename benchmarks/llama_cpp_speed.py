"""llama.cpp speed of the demo and of its best 80% plans, exported with `workbench export --to gguf`.

Side by side in one run, in llama.cpp itself (llama-cpp-python 0.3.36), at 1 and 2 threads, f16 and q8_0:
prompt processing (512 tokens in one batch) and generation (128 tokens, one at a time) tokens/s of
- the original demo (SmolLM2-135M-Instruct),
- the best uniform 80% plan (`plan suggest --target-params 0.8`),
- the best non-uniform 80% plan (`... --non-uniform`, exported as llama.cpp's `deci`),
each pruned model's speed-up against its ideal from the FLOP ratio of what llama.cpp computes (the GGUF's matmul
weights, the LM head, attention over the average span), and file sizes. Plus the demo's logits agreement with
`surgery.load` at f32 / f16 / q8_0 (max abs diff, top-1 agreement over 128 WikiText-2 positions).

Scores / plans / exports are made with the real CLI (subprocesses) into --work and reused when present.

    nice -n 10 python benchmarks/llama_cpp_speed.py --work /tmp/llb --json /tmp/llb/out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from llama_cpp_helpers import open_llama  # noqa: E402 - shared with the tests (AMX/repack workaround)

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
DEMO = "smollm2-135m"


def wb(*args: str) -> None:
    cmd = ["workbench", *map(str, args)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def prepare(work: Path, score_tokens: int) -> dict[str, Path]:
    """{model name: HF dir or source} for the original and both 80% plans (made once, reused)."""
    work.mkdir(parents=True, exist_ok=True)
    scores = work / "scores.safetensors"
    if not scores.exists():
        wb("score", DEMO, "--data", WIKI, "--tokens", score_tokens, "--seq-len", 256,
           "--method", "head-grad,kv-group-grad,neuron-taylor,layer-bi", "--out", scores)
    models = {"original": DEMO}
    for name, extra in (("uniform-80", []), ("nonuniform-80", ["--non-uniform"])):
        plan, out = work / f"{name}.json", work / name
        if not plan.exists():
            wb("plan", "suggest", DEMO, "--scores", scores, "--target-params", "0.8", *extra, "--out", plan)
        if not out.exists():
            wb("apply", plan, "--model", DEMO, "--out", out)
        models[name] = out
    return models


def export(models: dict[str, Path | str], work: Path, dtypes: list[str]) -> dict[tuple[str, str], Path]:
    files = {}
    for name, src in models.items():
        for dtype in dtypes if name == "original" else [d for d in dtypes if d != "f32"]:  # f32: agreement only
            path = work / f"{name}.{dtype}.gguf"
            if not path.exists():
                wb("export", src, "--to", "gguf", "--out", path, "--dtype", dtype)
            files[name, dtype] = path
    return files


def gguf_flops(path: Path, span: float) -> float:
    """FLOPs per token llama.cpp spends on `path`: 2 x every matmul weight (the LM head = the tied embedding when
    there is no output.weight) + 4 x heads x head_dim x span for attention."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    field = reader.fields[f"{arch}.attention.head_count"]
    heads = [int(field.parts[i][0]) for i in field.data]
    head_dim = int(reader.fields[f"{arch}.attention.key_length"].parts[-1][0])
    names = {t.name: t for t in reader.tensors}
    total = 0
    for t in reader.tensors:
        if len(t.shape) == 2 and t.name != "token_embd.weight":
            total += 2 * int(np.prod(t.shape))
    if "output.weight" not in names:
        total += 2 * int(np.prod(names["token_embd.weight"].shape))
    n_layer = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
    heads = heads * n_layer if len(heads) == 1 else heads
    return total + 4 * sum(heads) * head_dim * span


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of fn()."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def speed(path: Path, threads: int, prompt: list[int], gen: int) -> dict[str, float]:
    """Prompt and generation tokens/s in llama.cpp (f16 KV cache, as llama-cli by default), per wall second and
    per CPU second. On a shared machine the wall figure follows the load; the CPU figure much less (with 2 threads
    it includes OpenMP's spin-waiting, so compare it only between models at the same thread count)."""
    llm = open_llama(path, n_ctx=1024, n_threads=threads, logits_all=False, f32_cache=False, n_batch=512, n_ubatch=512)
    llm.eval(prompt[:8])  # warm-up
    llm.reset()
    pp_wall, pp_cpu = _timed(lambda: llm.eval(prompt))
    llm.reset()
    llm.eval(prompt[:16])

    def generate():
        tok = prompt[16]
        for _ in range(gen):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))

    tg_wall, tg_cpu = _timed(generate)
    llm.close()
    n = len(prompt)
    return {"pp": n / pp_wall, "pp_cpu": n / pp_cpu, "tg": gen / tg_wall, "tg_cpu": gen / tg_cpu}


def agreement(files: dict, ids: list[int]) -> list[dict]:
    import torch

    import surgery

    model = surgery.load(DEMO, dtype="float32")
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    rows = []
    for dtype in ("f32", "f16", "q8_0"):
        llm = open_llama(files["original", dtype], n_ctx=512, n_threads=2)
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
        llm.close()
        rows.append({"dtype": dtype, "max_abs_diff": float(np.abs(got - want).max()),
                     "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
                     "logit_range": float(np.abs(want).max())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llama_cpp_speed"))
    ap.add_argument("--score-tokens", type=int, default=8192)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="best of N (the machine is shared)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from surgery.sources import resolve_source

    models = prepare(args.work, args.score_tokens)
    files = export(models, args.work, ["f32", "f16", "q8_0"])
    tok = AutoTokenizer.from_pretrained(resolve_source(DEMO).path)
    ids = tok(WIKI.read_text()[:20000])["input_ids"]
    prompt = ids[: args.prompt]

    agree = agreement(files, ids[:128])
    for r in agree:
        print(f"logits {r['dtype']}: max abs diff {r['max_abs_diff']:.4f} (|logit| <= {r['logit_range']:.1f}), "
              f"top-1 agreement {r['top1_agreement']:.3f}", flush=True)

    results = []
    for threads in map(int, args.threads.split(",")):
        for dtype in ("f16", "q8_0"):
            best: dict[str, dict[str, float]] = {}
            for _ in range(args.repeats):  # interleaved, so load changes hit every model alike
                for name in models:
                    got = speed(files[name, dtype], threads, prompt, args.gen)
                    best[name] = {k: max(v, best.get(name, {}).get(k, 0.0)) for k, v in got.items()}
            base = best["original"]
            for name in models:
                path = files[name, dtype]
                ideal = {"pp": gguf_flops(files["original", dtype], args.prompt / 2) / gguf_flops(path, args.prompt / 2),
                         "tg": gguf_flops(files["original", dtype], 16 + args.gen / 2) / gguf_flops(path, 16 + args.gen / 2)}
                row = {"model": name, "dtype": dtype, "threads": threads, "file_mib": path.stat().st_size / 2**20}
                for k in ("pp", "tg"):
                    row[f"{k}_ideal"] = ideal[k]
                    for unit in (k, f"{k}_cpu"):
                        row[f"{unit}_tok_s"] = best[name][unit]
                        row[f"{unit}_speedup"] = best[name][unit] / base[unit]
                        row[f"{unit}_of_ideal"] = row[f"{unit}_speedup"] / ideal[k]
                results.append(row)
                print(f"{threads}t {dtype:5s} {name:14s} " + "  ".join(
                    f"{u} {row[f'{u}_tok_s']:7.1f} tok/s x{row[f'{u}_speedup']:.2f} ({row[f'{u}_of_ideal']:.0%} of "
                    f"x{row[f'{u[:2]}_ideal']:.2f})" for u in ("pp", "pp_cpu", "tg", "tg_cpu"))
                    + f"  {row['file_mib']:.1f} MiB", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"agreement": agree, "speed": results}, indent=2))


if __name__ == "__main__":
    main()
