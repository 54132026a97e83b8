"""Benchmark of the distillation step, side by side in one run, on the demo model (SmolLM2-135M-Instruct).

Teacher: the demo model. Student: the demo model with ~20% of its parameters removed (one KV group and 347 of 1536
MLP neurons per layer, by weight norm: `magnitude_plan` of benchmarks/apply_speed.py), i.e. "the 80% plan".

1. Step overhead: per repeat, interleaved, on the same micro-batch of tokens:
   a. teacher forward alone (inference mode);
   b. student forward + next-token CE + backward + gradient clipping + AdamW step alone (training it alone);
   c. one full distillation step (`surgery.distill.loop.Trainer.step`: teacher forward, student forward/backward,
      every loss term, clipping, AdamW step).
   ratio = median(c) / (median(a) + median(b)) (and the same with minimums, the least disturbed samples on a
   shared machine); target <= 1.15. Tokens/s = tokens per step / median(c).
2. With --redistill-steps N: a real job (the same code path as `workbench distill --foreground`) redistils the
   student from the teacher on tiny-shakespeare for N steps; WikiText-2 test perplexity (first --eval-tokens
   tokens) before and after, with the tokens used and the wall time (--teacher-ppl: the teacher's, for scale).

Run: python benchmarks/distill.py [--repeats 3] [--seq-len 256] [--batch-size 4] [--redistill-steps 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).parents[2] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"


def make_student(teacher: str, out: Path) -> Path:
    """Apply the ~80% magnitude plan of benchmarks/apply_speed.py to the teacher, written to `out`."""
    from surgery.pipeline import apply_to_source
    from surgery.plan import parse_plan
    from surgery.sources import resolve_source

    spec = importlib.util.spec_from_file_location("apply_speed", Path(__file__).parent / "apply_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    plan = parse_plan(mod.magnitude_plan(resolve_source(teacher).path))
    apply_to_source(plan, out, teacher, dtype="float32")
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_overhead(teacher: str, student: Path, args) -> dict:
    from surgery.distill.config import parse_config
    from surgery.distill.loop import Trainer, set_determinism
    from surgery.distill.losses import ce
    from surgery.distill.prepare import prepare
    from surgery.distill.world import World, pick_device

    cfg = parse_config({"version": 1, "teacher": teacher, "student": str(student), "data": str(SHAKESPEARE),
                        "losses": {"kl": 1.0, "ce": 0.1, "hidden-cos": 0.5}, "temperature": 2.0,
                        "steps": 10_000, "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": 1e-5,
                        "max_tokens": 64 * args.seq_len * args.batch_size, "device": args.device,
                        "deterministic": False})
    device = pick_device(args.device)
    set_determinism(0, False)
    prep = prepare(cfg, device)
    trainer = Trainer(cfg, prep, World(0, 1, 0, device))
    ids = trainer.micro_batches(0)[0].ids  # (batch, seq_len)

    def teacher_forward():
        with torch.inference_mode():
            prep.teacher(input_ids=ids, use_cache=False)

    def student_train():
        loss = ce(prep.student(input_ids=ids, use_cache=False).logits, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)  # part of any training step, distilled or not
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    step = [0]

    def distill_step():
        trainer.step(step[0])
        step[0] += 1

    for fn in (teacher_forward, student_train, distill_step):  # warm-up
        fn()
    times = {"teacher_forward": [], "student_fwd_bwd_step": [], "distill_step": []}
    for _ in range(args.repeats):
        times["teacher_forward"].append(timed(teacher_forward))
        times["student_fwd_bwd_step"].append(timed(student_train))
        times["distill_step"].append(timed(distill_step))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    tokens = args.batch_size * args.seq_len
    from surgery.estimate import count_params

    return {
        "tokens_per_step": tokens,
        "teacher_params": count_params(prep.teacher),
        "student_params": count_params(prep.student),
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "samples_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ratio": round(med["distill_step"] / (med["teacher_forward"] + med["student_fwd_bwd_step"]), 3),
        # on a shared machine the fastest sample is the least disturbed one: both ratios are reported
        "ratio_of_minimums": round(best["distill_step"] / (best["teacher_forward"] + best["student_fwd_bwd_step"]),
                                   3),
        "distill_tokens_per_s": round(tokens / med["distill_step"], 1),
    }


def redistill(teacher: str, student: Path, work: Path, args) -> dict:
    from surgery.distill.config import parse_config
    from surgery.jobs.worker import run_new_job

    cfg = parse_config({"version": 1, "teacher": teacher, "student": str(student), "data": str(SHAKESPEARE),
                        "eval_data": str(WIKITEXT), "eval_tokens": args.eval_tokens,
                        "losses": {"kl": 1.0, "ce": 0.1, "hidden-cos": 0.5}, "temperature": 2.0,
                        "steps": args.redistill_steps, "seq_len": args.seq_len, "batch_size": args.batch_size,
                        "lr": args.lr, "schedule": "cosine", "warmup_steps": min(5, args.redistill_steps // 5),
                        "checkpoint_every": 10_000, "device": args.device, "deterministic": False})
    job, code, events, wall = run_new_job(work / "jobs", cfg.to_json())
    if code != 0:
        raise SystemExit(f"redistillation job failed: {events[-1]}")
    evals = [e for e in events if e["event"] == "eval"]
    steps = [e for e in events if e["event"] == "step"]
    return {
        "steps": args.redistill_steps,
        "train_tokens": args.redistill_steps * args.batch_size * args.seq_len,
        "eval_tokens": evals[0]["targets"],
        "perplexity_before": round(evals[0]["perplexity"], 2),
        "perplexity_after": round(evals[-1]["perplexity"], 2),
        "loss_first_last": [round(steps[0]["losses"]["total"], 4), round(steps[-1]["losses"]["total"], 4)],
        "wall_s": round(wall, 1),
    }


def teacher_perplexity(teacher: str, args) -> dict:
    """The teacher's own perplexity on the same eval tokens (the ceiling redistillation aims at)."""
    from surgery.data import load_blocks
    from surgery.loading import load_model
    from surgery.metrics.perplexity import perplexity

    loaded = load_model(teacher, dtype="float32", device=args.device)
    blocks = load_blocks(WIKITEXT, loaded.tokenizer, args.seq_len, args.eval_tokens)
    result = perplexity(loaded.model, blocks)
    return {"perplexity": round(result.perplexity, 2), "eval_tokens": result.targets,
            "data_fingerprint": blocks.fingerprint}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--redistill-steps", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--teacher-ppl", action="store_true", help="also the teacher's eval perplexity")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is steadier on a machine shared with other work)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"model": args.model, "device": args.device, "threads": torch.get_num_threads(),
                    "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        student = make_student(args.model, Path(tmp) / "student-80")
        if not args.skip_overhead:
            result["step"] = step_overhead(args.model, student, args)
            print(json.dumps(result["step"], indent=2), flush=True)
        if args.redistill_steps:
            result["redistill"] = redistill(args.model, student, Path(tmp), args)
        if args.teacher_ppl:
            result["teacher"] = teacher_perplexity(args.model, args)
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
