"""Streaming apply (surgery.stream) at three sizes, every number measured side by side in one run.

demo        the real demo model (SmolLM2-135M, fp32): streaming `apply` of a uniform 80% plan against a plain
            `from_pretrained` + `save_pretrained` (+ tokenizer) of the same model: time ratio (goal <= 1.0) and
            peak RSS of each (each in its own process, /usr/bin/time -v).
synthetic7b a 7B-shaped Llama (random bf16 weights written once into a temp dir, ~13.5 GB) pruned to 80% by
            streaming: wall time, peak RSS (goal < 2 GB), bytes written per second against `cp` + `sync` of the
            same checkpoint. Everything is deleted at the end. `--shape 3b` for a smaller disk.
headers70b  a 70B-shaped header set (Llama-3-70B config; each shard a real safetensors header, then `truncate`d
            to its full size: sparse, ~0 bytes on disk): `inspect`, `plan validate` (its input
            fingerprint left out: it hashes every byte) and `apply --dry-run`, wall time and peak RSS.
datasteps   the demo model, a plan with data-driven steps (--plan, e.g. the non-uniform 80% plan of
            docs/benchmarks.md, + reconstruct on --calib-tokens of --calib): `apply` streaming (fitted layer by
            layer, spilled, streamed) against in memory (stream=False), each in its own process: wall, CPU
            seconds, peak RSS, and the sha256 of every output file (they must be equal).

Run: nice -n 10 python benchmarks/stream_apply.py demo|synthetic7b|headers70b|datasteps [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}  # fmt: skip


def measured(cmd: list[str], **kw) -> dict:
    """Run `cmd` under /usr/bin/time -v: wall seconds, peak RSS (MB), its stdout."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, **kw)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", p.stderr).group(1)) for k in ("User", "System"))
    return {"wall_s": wall, "rss_mb": rss_kb / 1024, "cpu_s": cpu, "stdout": p.stdout}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_checkpoint(out: Path, config: dict, fill: bool, seed: int = 0) -> int:
    """A bf16 Llama checkpoint in save_pretrained's layout (5 GB shards, index): random weights when `fill`, else
    headers only, each file truncated to its full size (sparse). Returns the bytes of its safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from surgery.stream.files import file_order, header_bytes, split_like_save_pretrained
    from surgery.stream.reads import TensorRead

    out.mkdir(parents=True)
    cfg = LlamaConfig(**config, dtype="bfloat16")
    cfg.save_pretrained(out)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    # save_pretrained's order (it sorts when reverting names); bf16 everywhere
    state = {n: ("BF16", tuple(t.shape)) for n, t in sorted(model.state_dict().items())}
    split = split_like_save_pretrained(state, "5GB")
    g = torch.Generator().manual_seed(seed)
    total = 0
    for name, tensors in sorted(split.filename_to_tensors.items()):
        ordered = file_order([TensorRead(n, *state[n]) for n in tensors])
        head = header_bytes(ordered)
        size = len(head) + sum(r.nbytes for r in ordered)
        with open(out / name, "wb") as f:
            f.write(head)
            if fill:
                for r in ordered:
                    t = (torch.randn(r.shape, generator=g) * 0.02).to(torch.bfloat16)
                    f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                f.truncate(size)
        total += size
    if split.is_sharded:
        index = {"metadata": {"total_parameters": sum(math.prod(s) for _, s in state.values()), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total


def uniform_plan(config: dict, keep: float = 0.8, seed: int = 0) -> dict:
    """~`keep` of the parameters: the same number of KV groups and neurons removed in every layer (random ones)."""
    rng = random.Random(seed)
    heads, kv, width = config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]
    drop_groups = max(1, round(kv * (1 - keep)))
    drop_neurons = round(width * (1 - keep))
    steps = []
    for i in range(config["num_hidden_layers"]):
        steps.append({"op": "prune_kv_groups", "layer": i, "groups": sorted(rng.sample(range(kv), drop_groups))})
        steps.append({"op": "prune_neurons", "layer": i, "neurons": sorted(rng.sample(range(width), drop_neurons))})
    del heads
    return {"version": 1, "steps": steps}


def workbench(*args: str) -> list[str]:
    return ["workbench", *args]


def _env(baseline: Path | None) -> dict | None:
    """The environment that makes a child process import another checkout's code (None: this one's). Children run
    with cwd outside the repository, else `python -c` would import the checkout in the current directory first."""
    return None if baseline is None else {**os.environ, "PYTHONPATH": str(baseline)}


def _uptime_now() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def demo(work: Path, repeats: int, baseline: Path | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from apply_speed import magnitude_plan

    from surgery.sources import resolve_source

    src = resolve_source("smollm2-135m").path
    plan_file = work / "plan.json"
    plan_file.write_text(json.dumps(magnitude_plan(src)))
    plain_code = (
        "import sys, time, torch; torch.set_num_threads(1)\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "t, c = time.perf_counter(), time.process_time()\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto'); m.save_pretrained(sys.argv[2])\n"
        "AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])\n"
        "print(time.perf_counter() - t, time.process_time() - c)\n"
    )
    stream_code = (  # the same imports before the clock starts as the plain code (torch, transformers' package)
        "import sys, time, torch, transformers; torch.set_num_threads(1)\n"
        "from surgery.pipeline import apply_to_source; from surgery.plan import load_plan\n"
        "plan = load_plan(sys.argv[3])\n"
        "t, c = time.perf_counter(), time.process_time()\n"
        "r = apply_to_source(plan, sys.argv[2], sys.argv[1], stream=True)\n"
        "assert r.manifest['apply']['path'] == 'stream'\n"
        "print(time.perf_counter() - t, time.process_time() - c)\n"
    )
    import_code = "import torch, transformers, surgery.pipeline, surgery.stream; from transformers import AutoModelForCausalLM"
    base = measured([sys.executable, "-c", import_code], cwd=work)
    # `--baseline DIR`: the same streaming apply with another checkout's code, in the same rounds (before/after)
    runs = [("plain", plain_code, None), ("stream", stream_code, None)] + \
        ([("before", stream_code, baseline)] if baseline else [])
    # warm-up: the source fingerprint is cached after its first computation (as it is for every later apply)
    for name, code, env in runs[1:]:
        subprocess.run([sys.executable, "-c", code, str(src), str(work / f"warm-{name}"), str(plan_file)],
                       check=True, capture_output=True, cwd=work, env=_env(env))
    print(f"demo: uptime at start: {_uptime_now()}", flush=True)
    rows = {name: [] for name, _, _ in runs}
    for i in range(repeats):
        for name, code, env in runs:
            out = work / f"{name}{i}"
            m = measured([sys.executable, "-c", code, str(src), str(out), str(plan_file)], cwd=work, env=_env(env))
            wall, cpu = map(float, m["stdout"].strip().splitlines()[-1].split())
            rows[name].append((wall, m["rss_mb"], cpu, m["wall_s"], m["cpu_s"]))
            shutil.rmtree(out)
    med = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    cpu = {k: sorted(x[2] for x in v)[len(v) // 2] for k, v in rows.items()}  # CPU s of all threads: less noisy
    print(f"demo: interpreter + imports alone: peak RSS {base['rss_mb']:.0f} MB")
    for k, (s, *_) in med.items():
        spread = (max(x[0] for x in rows[k]) - min(x[0] for x in rows[k])) / 2
        print(f"demo: {k:6s} {s:.2f} s ±{spread:.2f} wall, {cpu[k]:.2f} s CPU (in-process, median of {repeats}), "
              f"peak RSS {max(x[1] for x in rows[k]):.0f} MB")
    whole = {k: [sorted(x[i] for x in v)[len(v) // 2] for i in (3, 4)] for k, v in rows.items()}
    for k in rows.keys() - {"plain"}:
        print(f"demo: {k} streaming apply / plain load+save = {med[k][0] / med['plain'][0]:.2f} wall, "
              f"{cpu[k] / cpu['plain']:.2f} CPU (goal <= 1.0)")
        print(f"demo: whole processes (interpreter, every import, the work): plain {whole['plain'][0]:.2f} s wall / "
              f"{whole['plain'][1]:.2f} s CPU, {k} {whole[k][0]:.2f} s / {whole[k][1]:.2f} s; ratio "
              f"{whole[k][0] / whole['plain'][0]:.2f} wall, {whole[k][1] / whole['plain'][1]:.2f} CPU")
    print(f"demo: uptime at the end: {_uptime_now()}")


def synthetic(work: Path, shape: str, baseline: Path | None = None) -> None:
    config = SHAPES[shape]
    src, out, copy = work / "src", work / "out", work / "copy"
    from surgery.estimate import count_params, meta_model

    size = 2 * count_params(meta_model({"model_type": "llama", **config}))  # bf16 bytes
    free = shutil.disk_usage(work).free
    if free < 2.2 * size:  # the input, then cp's copy of it (or the output) beside it
        raise SystemExit(f"{shape}: needs ~{2.2 * size / 1e9:.0f} GB free, {work} has {free / 1e9:.0f} GB: use --shape 3b")
    t = time.perf_counter()
    total = write_checkpoint(src, config, fill=True)
    print(f"{shape}: wrote {total / 1e9:.2f} GB of random bf16 weights in {time.perf_counter() - t:.0f} s "
          f"(disk had {free / 1e9:.0f} GB free)")
    plan = work / "plan.json"
    plan.write_text(json.dumps(uniform_plan(config)))
    v = measured(workbench("plan", "validate", str(plan), "--model", str(src), "--json"))
    info = json.loads(v["stdout"])
    kept = info.get("params_after", 0) / max(info.get("params_before", 1), 1)
    print(f"{shape}: plan validate (cold: fingerprints every input byte) {v['wall_s']:.1f} s, peak RSS "
          f"{v['rss_mb']:.0f} MB; plan keeps {kept:.1%} of the parameters")
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(copy)], check=True)
    subprocess.run(["sync"], check=True)
    cp_s = time.perf_counter() - t
    cp_rate = dir_bytes(copy) / cp_s
    shutil.rmtree(copy)
    subprocess.run(["sync"], check=True)
    print(f"{shape}: cp -r + sync of the input: {cp_s:.1f} s, {cp_rate / 1e6:.0f} MB/s ({_uptime_now()})", flush=True)
    # `--baseline DIR` first (the later run finds less of the input in the page cache: the earlier output pushed
    # some of it out), then this checkout's code; each output deleted before the next run
    for label, env in ([("before (--baseline)", baseline)] if baseline else []) + [("streaming apply", None)]:
        a = measured(workbench("apply", str(plan), "--model", str(src), "--out", str(out), "--stream", "--json"),
                     cwd=work, env=_env(env))
        manifest = json.loads(a["stdout"])
        written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        print(f"{shape}: {label} (--stream, fingerprint cached): {a['wall_s']:.1f} s wall, "
              f"{a['cpu_s']:.1f} s CPU, peak RSS "
              f"{a['rss_mb']:.0f} MB (goal < 2 GB), wrote {written / 1e9:.2f} GB = {written / a['wall_s'] / 1e6:.0f} MB/s "
              f"({written / a['wall_s'] / cp_rate:.0%} of cp), read {manifest['apply']['bytes_read'] / 1e9:.2f} GB; "
              f"params {manifest['params']['before']:,} -> {manifest['params']['after']:,}; {_uptime_now()}", flush=True)
        shutil.rmtree(out)
        subprocess.run(["sync"], check=True)


def headers70b(work: Path, baseline: Path | None = None) -> None:
    """`inspect`, `plan validate`, `estimate` and `apply --dry-run` on a 70B-shaped header set, each command in its
    own process (`--baseline DIR`: each also with that checkout's code, right before this one's)."""
    config = SHAPES["70b"]
    src = work / "h70b"
    print(f"70b: uptime at start: {_uptime_now()}")
    t = time.perf_counter()
    total = write_checkpoint(src, config, fill=False)
    on_disk = sum(p.stat().st_blocks * 512 for p in src.iterdir())
    print(f"70b: header set of {len(list(src.glob('*.safetensors')))} shards, {total / 1e9:.1f} GB apparent, "
          f"{on_disk / 1e6:.1f} MB on disk, written in {time.perf_counter() - t:.1f} s")
    plan = work / "plan70b.json"
    plan.write_text(json.dumps(uniform_plan(config)))
    # `plan validate` is the real CLI minus the input fingerprint (sha256 of every byte: 141 GB here, ~5 min of one
    # idle core at the ~0.5 GB/s measured on this box), which a header set cannot make cheaper: it is stubbed out
    validate_code = (
        "import sys; import surgery.pipeline as p; p.source_fingerprint = lambda resolved: 'sha256:' + '0' * 64\n"
        "from workbench.cli import main; sys.argv = ['workbench', 'plan', 'validate', *sys.argv[1:]]; main()\n"
    )
    # what the TUI's totals and `plan suggest` compute: exact parameters and FLOPs/token before and after, from the
    # headers when given the checkpoint's directory (torch-free; code without `source_dir` counts on the meta device),
    # and on a meta-device model (torch + transformers) without it
    estimate_code = (
        "import inspect, sys; from surgery.plan import load_plan; from surgery.resolve import resolve_plan\n"
        "from surgery.shapes import shape_from_config; from surgery.sources import read_config_file\n"
        "from pathlib import Path; from surgery.estimate import estimate\n"
        "cfg = read_config_file(Path(sys.argv[1])); r = resolve_plan(load_plan(sys.argv[2]), shape_from_config(cfg))\n"
        "headers = sys.argv[3] == 'headers' and 'source_dir' in inspect.signature(estimate).parameters\n"
        "e = estimate(cfg, r, **({'source_dir': sys.argv[1]} if headers else {}))\n"
        "print(f'{e.params_before:,} -> {e.params_after:,} params, {e.flops_before / 1e9:.1f} -> '\n"
        "      f'{e.flops_after / 1e9:.1f} GFLOPs/token, torch imported: {\"torch\" in sys.modules}', end='')\n"
    )
    rows = [
        ("inspect", workbench("inspect", str(src), "--json")),
        ("plan validate (the CLI, input fingerprint stubbed)",
         [sys.executable, "-c", validate_code, str(plan), "--model", str(src), "--json"]),
        ("estimate from the headers", [sys.executable, "-c", estimate_code, str(src), str(plan), "headers"]),
        ("estimate on a meta-device model", [sys.executable, "-c", estimate_code, str(src), str(plan), "meta"]),
        ("apply --dry-run", workbench("apply", str(plan), "--model", str(src), "--dry-run", "--json")),
    ]
    for name, cmd in rows:
        for label, env in ([("before (--baseline)", baseline)] if baseline else []) + [("this checkout", None)]:
            m = measured(cmd, cwd=work, env=_env(env))
            extra = f"; {m['stdout']}" if name.startswith("estimate") else ""
            if name.startswith("plan"):
                v = json.loads(m["stdout"])
                extra = f"; {v['params_before']:,} -> {v['params_after']:,} params"
            if name.startswith("apply"):
                d = json.loads(m["stdout"])
                extra = (f"; planned by {d['planned_by']}, {len(d['reads'])} tensor reads, reads "
                         f"{d['bytes_read'] / 1e9:.1f} GB, writes {d['bytes_written'] / 1e9:.1f} GB in "
                         f"{len(d['shards'])} shards")
            print(f"70b: {name} [{label}]: {m['wall_s']:.1f} s ({m['cpu_s']:.1f} s CPU), peak RSS "
                  f"{m['rss_mb']:.0f} MB{extra}", flush=True)
    print(f"70b: uptime at the end: {_uptime_now()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["demo", "synthetic7b", "headers70b", "datasteps"])
    ap.add_argument("--work", type=Path, default=None, help="Scratch directory (default: a new one under /tmp).")
    ap.add_argument("--shape", choices=["7b", "3b"], default="7b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="Keep the scratch directory.")
    ap.add_argument("--baseline", type=Path, help="demo / synthetic7b / headers70b: also run with this checkout's code "
                    "(PYTHONPATH), in the same run: the before/after pair.")
    ap.add_argument("--plan", type=Path, help="datasteps: the structural plan to calibrate (made for smollm2-135m).")
    ap.add_argument("--calib", type=Path, help="datasteps: calibration text file.")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--inputs", choices=["pruned", "original"], default="original")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wb-stream-", dir=args.work))
    try:
        if args.what == "demo":
            demo(work, args.repeats, args.baseline)
        elif args.what == "datasteps":
            if args.plan is None or args.calib is None:
                raise SystemExit("datasteps needs --plan PLAN.json and --calib TEXT")
            datasteps(work, args.plan, args.calib, args.calib_tokens, args.seq_len, args.inputs, args.repeats)
        elif args.what == "synthetic7b":
            synthetic(work, args.shape, args.baseline)
        else:
            headers70b(work, args.baseline)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


# defined after main() (called at run time), away from the other subcommands' functions
def datasteps(work: Path, plan: Path, calib: Path, tokens: int, seq_len: int, inputs: str, repeats: int) -> None:
    """`datasteps`: a structural plan + reconstruct applied to the demo streaming and in memory, side by side."""
    import os

    from surgery.plan import Reconstruct, load_plan
    from surgery.reconstruct import calibrate_for_source

    def load() -> str:
        return "load avg " + " ".join(f"{x:.1f}" for x in os.getloadavg())

    start = time.perf_counter()
    calibrated = calibrate_for_source(load_plan(plan), str(calib), tokens=tokens, seq_len=seq_len,
                                      reconstruct=Reconstruct(op="reconstruct", inputs=inputs))
    plan_file = work / "plan_reconstruct.json"
    plan_file.write_text(calibrated.model_dump_json(exclude_none=True))
    cal = calibrated.calibration
    print(f"datasteps: {plan.name} + reconstruct (inputs {inputs}, ridge {calibrated.steps[-1].ridge}) on "
          f"{cal.tokens:,} tokens of {calib.name} (seq-len {cal.seq_len}, batch {cal.batch_size}); calibrated in "
          f"{time.perf_counter() - start:.1f} s ({load()})", flush=True)
    code = (  # the same imports before the clock starts on both sides; one thread each (the box is shared)
        "import sys, time, json, hashlib, pathlib, torch, transformers; torch.set_num_threads(1)\n"
        "from surgery.pipeline import apply_to_source; from surgery.plan import load_plan\n"
        "plan, out, stream = load_plan(sys.argv[3]), pathlib.Path(sys.argv[2]), sys.argv[4] == 'stream'\n"
        "t, c = time.perf_counter(), time.process_time()\n"
        "r = apply_to_source(plan, out, sys.argv[1], stream=stream)\n"
        "wall, cpu = time.perf_counter() - t, time.process_time() - c\n"
        "sha = {p.name: hashlib.file_digest(p.open('rb'), 'sha256').hexdigest() for p in sorted(out.iterdir())\n"
        "       if p.name != 'surgery.json'}  # in chunks: a whole shard read at once would count in the peak RSS\n"
        "print(json.dumps({'wall': wall, 'cpu': cpu, 'apply': r.manifest['apply'], 'sha': sha}))\n"
    )
    # warm-up: the source fingerprint and the tokenizer round trip are cached after their first computation (the
    # structural plan alone: it streams in seconds)
    subprocess.run([sys.executable, "-c", code, "smollm2-135m", str(work / "warm"), str(plan), "stream"],
                   check=True, capture_output=True)
    shutil.rmtree(work / "warm")
    rows: dict[str, list] = {"in_memory": [], "stream": []}
    digests = {}
    for i in range(repeats):
        for name in rows:
            out = work / f"{name}{i}"
            m = measured([sys.executable, "-c", code, "smollm2-135m", str(out), str(plan_file), name])
            r = json.loads(m["stdout"].strip().splitlines()[-1])
            assert r["apply"]["path"] == name and (name == "in_memory" or r["apply"]["data_steps"] == "layer_by_layer")
            digests.setdefault(name, r["sha"])
            assert digests[name] == r["sha"], f"{name}: another output on repeat {i}"
            rows[name].append((r["wall"], r["cpu"], m["rss_mb"], m["wall_s"], m["cpu_s"], r["apply"]))
            print(f"  {name} #{i}: {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU in-process; whole process "
                  f"{m['wall_s']:.1f} s / {m['cpu_s']:.1f} s CPU, peak RSS {m['rss_mb']:.0f} MB ({load()})", flush=True)
            shutil.rmtree(out)
    same = digests["in_memory"] == digests["stream"]
    med = {k: [sorted(x[j] for x in v)[len(v) // 2] for j in range(5)] for k, v in rows.items()}
    for k, (wall, cpu, rss, pwall, pcpu) in med.items():
        print(f"datasteps: {k:9s} {wall:.1f} s wall, {cpu:.1f} s CPU (in-process, median of {repeats}); whole "
              f"process {pwall:.1f} s / {pcpu:.1f} s CPU; peak RSS {max(x[2] for x in rows[k]):.0f} MB")
    s, m = med["stream"], med["in_memory"]
    spill = rows["stream"][0][5]["spill_bytes"]
    print(f"datasteps: streaming / in memory = {s[0] / m[0]:.2f} wall, {s[1] / m[1]:.2f} CPU, "
          f"{max(x[2] for x in rows['stream']) / max(x[2] for x in rows['in_memory']):.2f} peak RSS; spill "
          f"{spill / 1e6:.1f} MB; sha256 of all {len(digests['stream'])} files equal: {same}")
    if not same:
        raise SystemExit(f"outputs differ: {digests}")


if __name__ == "__main__":
    main()
