"""Peak RSS of `workbench export smollm2-135m --to vllm` before and after the one-tensor-at-a-time shard writer,
side by side in one run, with the model's own load as the baseline.

before  a checkout of the code to compare with (--before DIR, e.g. `git worktree add --detach /tmp/h7wt 893d518~1`):
        every padded tensor is built into one state dict, converted to the export dtype, then `save_file` writes it.
after   this checkout: surgery/export/safetensors_shards.py takes shapes in a first pass, then writes each tensor's
        bytes into its shard, one tensor at a time.
load    this checkout, `surgery.loading.load_model` of the same source, every weight read once, nothing written
        (what any export holds).

Each is its own process (one thread), reaped with os.wait4, so its ru_maxrss is its own peak. The exported weights
of before and after are compared tensor by tensor (they must be equal).

Run: nice -n 10 python benchmarks/vllm_export_memory.py --before /tmp/h7wt [--dtype bfloat16] [--source smollm2-135m]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib(argv: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def export_argv(source: str, out: Path, dtype: str) -> list[str]:
    code = ("import sys; from surgery.export.vllm import export_vllm; "
            "export_vllm(sys.argv[1], sys.argv[2], dtype=sys.argv[3])")
    return [sys.executable, "-c", code, source, str(out), dtype]


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def state(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    sa, sb = state(a), state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="checkout of the code to compare with")
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vllm_mem_"))
    # every weight read once: a model mmap'd from safetensors is resident only where touched, and an export
    # touches all of it
    load_code = ("import sys, torch; from surgery.loading import load_model; "
                 "m = load_model(sys.argv[1], dtype='float32').model; "
                 "[float(p.detach().sum()) for p in m.parameters()]")
    load = peak_rss_mib([sys.executable, "-c", load_code, args.source], ROOT)
    before = peak_rss_mib(export_argv(args.source, work / "before", args.dtype), args.before.resolve())
    after = peak_rss_mib(export_argv(args.source, work / "after", args.dtype), ROOT)
    weights = sum(f.stat().st_size for f in (work / "after").glob("*.safetensors")) / 2**20
    print(f"source {args.source}, dtype {args.dtype}, exported weights {weights:.1f} MiB")
    print(f"peak RSS MiB: load only {load:.0f}, before {before:.0f} (+{before - load:.0f} over load), "
          f"after {after:.0f} (+{after - load:.0f} over load)")
    print(f"export's own memory after / before: {(after - load) / max(before - load, 1):.2f}")
    print(f"same tensors before and after: {same_weights(work / 'before', work / 'after')}")


if __name__ == "__main__":
    main()
