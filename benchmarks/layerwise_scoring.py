"""`workbench score --layerwise` against whole-model scoring, side by side in one run: peak RSS, time, same scores.

synthetic  a ~1B-shaped Llama (hidden 2048, 16 layers, MLP 5632, 32/8 heads, untied 49,152-token vocabulary:
           the demo's tokenizer), random bf16 weights written once into a temp dir (4 shards + index, ~1.9 GB),
           scored in float32 on WikiText-2 by `workbench score` without and with `--layerwise`, each in its own
           process under /usr/bin/time -v (peak RSS), one thread. Deleted at the end unless --keep.
demo       the real demo model (SmolLM2-135M, fp32): the same two runs, repeated, for the time ratio.

Both modes' score files are compared tensor by tensor (bitwise and max abs difference).

Run: nice -n 10 python benchmarks/layerwise_scoring.py synthetic|demo [--work DIR] [--tokens N] [--repeats N]
[--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False)
METHODS = "head-act,neuron-act,neuron-wanda,layer-bi,channel-norm"


def measured(cmd: list[str]) -> dict:
    """Run `cmd` under /usr/bin/time -v with one thread: wall seconds and peak RSS (MB)."""
    # the checkout first on the path: the children run this tree's code whatever the installed copy points at
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return {"wall_s": wall, "rss_mb": rss_kb / 1024}


def write_checkpoint(out: Path, tokenizer_from: Path, shards: int = 4, seed: int = 0) -> int:
    """A random bf16 Llama of SHAPE in `out` (config, `shards` safetensors files + index, the demo's tokenizer);
    one shard in memory at a time. Returns the bytes of its safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    out.mkdir(parents=True)
    cfg = LlamaConfig(**SHAPE, dtype="bfloat16")
    cfg.save_pretrained(out)
    with torch.device("meta"):
        names = {n: tuple(t.shape) for n, t in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    layers = SHAPE["num_hidden_layers"]
    group = lambda n: (int(n.split(".")[2]) * shards // layers) if n.startswith("model.layers.") else shards - 1  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        state = {}
        for n, shape in names.items():
            if group(n) != s:
                continue
            t = torch.ones(shape) + 0.1 * torch.randn(shape, generator=g) if "norm" in n else \
                torch.randn(shape, generator=g) * 0.02
            state[n] = t.to(torch.bfloat16)
            weight_map[n] = file
        save_file(state, str(out / file), metadata={"format": "pt"})
        total += (out / file).stat().st_size
        del state
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    return total


def score(src: str, out: Path, tokens: int, layerwise: bool, methods: str) -> dict:
    cmd = [sys.executable, "-c", "from workbench.cli import main; main()", "score", src, "--data", str(WIKI), "--tokens", str(tokens), "--seq-len", "256",
           "--batch-size", "2", "--method", methods, "--out", str(out), "--json"]
    r = measured(cmd + (["--layerwise"] if layerwise else []))
    from surgery.importance import load_scores

    r["scores"] = load_scores(out)
    return r


def compare(a, b) -> str:
    """"bitwise equal" or which metrics differ and by how much (max relative difference)."""
    assert a.tensors.keys() == b.tensors.keys()
    rel: dict[str, float] = {}
    for k in a.tensors:
        if not a.tensors[k].equal(b.tensors[k]):
            diff = float(((a.tensors[k] - b.tensors[k]).abs() / a.tensors[k].abs().clamp_min(1e-30)).max())
            metric = k.rpartition("/")[2]
            rel[metric] = max(rel.get(metric, 0.0), diff)
    if not rel:
        return "every tensor bitwise equal"
    return "bitwise equal except " + ", ".join(f"{m} (max relative difference {d:.2g})" for m, d in sorted(rel.items()))


def report(label: str, whole: dict, layer: dict) -> None:
    ws, ls = whole["scores"].meta.seconds, layer["scores"].meta.seconds
    print(f"{label}: whole model peak RSS {whole['rss_mb']:,.0f} MB, layerwise {layer['rss_mb']:,.0f} MB "
          f"(ratio {layer['rss_mb'] / whole['rss_mb']:.2f}); scoring time {ws:.1f} s vs {ls:.1f} s "
          f"(layerwise / whole {ls / ws:.2f}); process wall {whole['wall_s']:.1f} s vs {layer['wall_s']:.1f} s; "
          f"{len(whole['scores'].tensors)} tensors: {compare(whole['scores'], layer['scores'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["synthetic", "demo"])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from surgery.pipeline import source_fingerprint
    from surgery.sources import resolve_source

    work = Path(tempfile.mkdtemp(prefix="layerwise-", dir=args.work))
    try:
        demo = resolve_source("smollm2-135m")
        if args.which == "synthetic":
            src = work / "synthetic-1b"
            t = time.perf_counter()
            size = write_checkpoint(src, demo.path)
            print(f"wrote {src}: {size / 1e9:.2f} GB of bf16 safetensors in {time.perf_counter() - t:.0f} s")
            resolved = resolve_source(str(src))
        else:
            src, resolved = "smollm2-135m", demo
        source_fingerprint(resolved)  # hashed once here (cached): neither timed run pays for it
        tokens = args.tokens or (512 if args.which == "synthetic" else 2048)
        print(f"{args.which}: {tokens} WikiText-2 tokens (seq-len 256, batch 2), methods {METHODS}, float32, "
              "1 thread")
        for i in range(args.repeats):  # the order alternates: a busy machine then slows both alike
            modes = [False, True] if i % 2 == 0 else [True, False]
            runs = {lw: score(str(src), work / f"{lw}.safetensors", tokens, lw, METHODS) for lw in modes}
            report(f"{args.which} run {i + 1} ({'whole first' if i % 2 == 0 else 'layerwise first'})",
                   runs[False], runs[True])
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
