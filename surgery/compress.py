"""The whole recipe in one call (`workbench compress`): score -> suggest -> [reconstruct] -> prune -> redistill ->
evaluate, on a model and a parameter budget.

Scoring and the suggestion run here (their outputs are inputs of the plan); everything after them is an ordinary
pipeline file (`surgery.jobs.pipeline`): a `prune` stage carrying the suggested steps (and, with reconstruction,
the calibration block and the `reconstruct` step) and a `redistill` stage, a resumable job like any other. The
output directory gets the final model and `pipeline.json` with each stage's wall time and before/after metrics,
the scoring and suggestion in its `prelude`, and the generated pipeline itself, so
`workbench jobs pipeline` can replay it.

Every phase leaves its result in the work directory before the next one starts (prelude.json: scoring and
suggestion; pipeline/progress.json: base metrics, finished stages, the redistillation job's id), so the same call
with the same `work` continues an interrupted run from the phase it reached, with the uninterrupted run's bytes
(the compress job, workbench/compress_job.py, uses its job directory as `work`: `workbench jobs resume`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import UserError

# the measured defaults (docs/benchmarks.md, scoring): gradient head scores for non-uniform plans, Taylor neurons
SCORE_METHODS = "head-grad,head-delta,neuron-taylor"


@dataclass
class CompressOptions:
    """What `compress` does besides the source and target (the CLI flags, one for one)."""

    data: str
    tokens: int
    eval_data: str | None = None
    eval_tokens: int | None = None
    eval_seq_len: int = 2048
    calib_tokens: int = 8192
    calib_seq_len: int = 256
    # the reconstruction's own calibration: 16,384 tokens in blocks of 2,048 measured best on the demo's 80% plans
    # (docs/benchmarks.md, "Recovery without training": 2.80x against 3.01x with 8,192 and 3.54x with 4,096 x 1,024)
    recon_tokens: int = 16384
    recon_seq_len: int = 2048
    non_uniform: bool = False
    reconstruct: bool = True
    seq_len: int = 512
    batch_size: int = 2
    lr: float = 2e-4
    schedule: str = "cosine"
    temperature: float = 2.0
    losses: dict[str, float] = field(default_factory=lambda: {"kl": 1.0, "ce": 0.1})
    device: str = "cpu"
    seed: int = 0


def redistill_steps(opts: CompressOptions) -> int:
    """Optimizer steps that spend the --tokens budget (whole steps of batch_size x seq_len tokens)."""
    per_step = opts.seq_len * opts.batch_size
    if opts.tokens < per_step:
        raise UserError(f"--tokens {opts.tokens} is less than one redistillation step ({opts.batch_size} x "
                        f"{opts.seq_len} = {per_step} tokens)")
    return opts.tokens // per_step


def check_job_options(opts: CompressOptions) -> None:
    """Refuse a schedule or temperature the redistillation job would refuse, before the scoring runs."""
    from typing import get_args

    from surgery.distill.config import DistillConfig

    schedules = get_args(DistillConfig.model_fields["schedule"].annotation)
    if opts.schedule not in schedules:
        raise UserError(f"--schedule {opts.schedule}: one of {', '.join(schedules)}")
    if not opts.temperature > 0:
        raise UserError(f"--temperature {opts.temperature}: must be > 0")


def build_pipeline(source: str, plan, opts: CompressOptions) -> dict:
    """The pipeline document of the recipe after the suggestion: prune (+ reconstruct) then redistill."""
    steps = redistill_steps(opts)
    prune = {"stage": "prune", "steps": [s.model_dump(mode="json", exclude_none=True) for s in plan.steps]}
    if plan.calibration is not None:
        prune["calibration"] = plan.calibration.model_dump(mode="json", exclude_none=True)
    job = {"steps": steps, "losses": opts.losses, "schedule": opts.schedule, "warmup_steps": min(3, steps // 10),
           "lr": opts.lr, "temperature": opts.temperature, "checkpoint_every": max(1, steps // 4)}
    doc = {"version": 1, "kind": "pipeline", "model": plan.model.model_dump(mode="json", exclude_none=True)
           if plan.model else {"source": source}, "seed": opts.seed,
           "defaults": {"data": opts.data, "seq_len": opts.seq_len, "batch_size": opts.batch_size,
                        "device": opts.device},
           "stages": [prune, {"stage": "redistill", "job": job}]}
    if opts.eval_data:
        doc["eval"] = {"data": opts.eval_data, "tokens": opts.eval_tokens, "seq_len": opts.eval_seq_len}
    return doc


PRELUDE = "prelude.json"  # in the work directory: the finished scoring and suggestion, what a resume reuses


def compress(source: str, target_params: float, out: str | Path, opts: CompressOptions, *, jobs_root: Path,
             overwrite: bool = False, progress: Callable[[str], None] | None = None, work: str | Path | None = None,
             cancel: threading.Event | None = None, on_job: Callable | None = None) -> dict:
    """Run the recipe; returns the record written to `out/pipeline.json`.

    Args:
        work: The work directory (scores, plan, the generated pipeline, the stages' models). Default: a new
            `<jobs_root>/compress-<id>/`. Run again with the same `work` and arguments, the recipe continues from
            the phase it reached: the scoring and the suggestion (prelude.json) and the pipeline's finished stages
            (pipeline/progress.json) are reused, an interrupted redistillation continues from its job's newest
            checkpoint; the result is the uninterrupted run's, byte for byte.
        cancel: Set -> `CompressCancelled` at the next phase boundary (what finished is kept for a resume).
        on_job: Passed to `run_pipeline` (the redistillation job, before it runs here; None after).

    Raises:
        UserError: Bad input (found before the scoring starts where it can be: the output directory, the data
            files, the budget), or a failed stage.
        CompressCancelled: `cancel` was set.
        surgery.jobs.pipeline.PipelineCancelled: The redistillation job was cancelled (it checkpointed first).
    """
    from surgery.jobs.pipeline import RECORD, parse_pipeline, run_pipeline
    from surgery.jobs.store import new_job_id
    from surgery.plan import write_text_atomic

    out = Path(out)
    if work is not None and (published := published_record(out, Path(work))) is not None:
        return published  # an earlier attempt finished and published it (and was stopped before saying so)
    check_inputs(out, target_params, opts, overwrite)
    say = progress or (lambda _m: None)

    def boundary() -> None:
        if cancel is not None and cancel.is_set():
            raise CompressCancelled("compress cancelled")

    work = Path(work) if work is not None else Path(jobs_root) / new_job_id("compress")
    work.mkdir(parents=True, exist_ok=True)
    prelude = _read_prelude(work, target_params)

    def save_prelude() -> None:
        write_text_atomic(work / PRELUDE, json.dumps(prelude, indent=2, sort_keys=True) + "\n")

    boundary()
    if "score" in prelude and Path(prelude["score"]["file"]).is_file():
        say(f"scoring: done before, reused ({prelude['score']['file']})")
        score_path = Path(prelude["score"]["file"])
    else:
        score_path = _score(source, opts, work, prelude, say)
        save_prelude()
    boundary()
    if "suggest" in prelude and (work / "pipeline.json").is_file():
        say(f"suggesting a plan: done before, reused ({prelude['suggest']['plan']})")
        from surgery.jsonfile import read_json_file

        doc = read_json_file(work / "pipeline.json", "the compress pipeline")
    else:
        doc = _suggest(source, target_params, opts, work, score_path, prelude, say)
        # the suggestion counts as done once its pipeline is on disk: a resume reads that very document
        write_text_atomic(work / "pipeline.json", json.dumps(doc, indent=2, sort_keys=True) + "\n")
        save_prelude()
    boundary()
    pipeline = parse_pipeline(doc, "the compress pipeline")
    record = run_pipeline(pipeline, out, jobs_root=Path(jobs_root), overwrite=overwrite, progress=say,
                          prelude=prelude, work=work / "pipeline", on_job=on_job)
    add_training_throughput(record, opts)
    write_text_atomic(out / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def check_inputs(out: Path, target_params: float, opts: CompressOptions, overwrite: bool = False) -> None:
    """What `compress` refuses before anything runs: the output directory, the budget, the data files, the job
    options (a front end calls it before it creates a job).

    Raises:
        UserError: The first problem, in one line.
    """
    from surgery.export import check_output_dir

    check_output_dir(Path(out), overwrite)
    if not 0 < target_params < 1:
        raise UserError(f"--target-params {target_params}: the fraction of parameters kept, strictly between 0 and 1")
    for name, path in (("--data", opts.data), ("--eval-data", opts.eval_data)):
        if path and not path.startswith("hf:") and not Path(path).expanduser().is_file():
            raise UserError(f"{name}: no such file: {path}")
    redistill_steps(opts)  # a budget below one step is refused before anything runs
    check_job_options(opts)


class CompressCancelled(Exception):
    """`compress` stopped at a phase boundary because its cancel event was set."""


def _read_prelude(work: Path, target_params: float) -> dict:
    """The work directory's finished phases (a new prelude for a new directory).

    Raises:
        UserError: The directory was used for another budget (its scores and plan are not this run's).
    """
    if not (work / PRELUDE).is_file():
        return {"work": str(work), "target_params": target_params}
    from surgery.jsonfile import read_json_file

    prelude = read_json_file(work / PRELUDE, "compress prelude")
    if not isinstance(prelude, dict) or prelude.get("target_params") != target_params:
        raise UserError(f"{work} holds a compress run for another budget: resume it with the same options")
    return prelude


def published_record(out: Path, work: Path) -> dict | None:
    """The record in `out/pipeline.json` when the compress run of `work` wrote it, else None."""
    from surgery.jobs.pipeline import RECORD

    try:
        record = json.loads((out / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and (record.get("prelude") or {}).get("work") == str(work) else None


def _score(source: str, opts: CompressOptions, work: Path, prelude: dict, say) -> Path:
    from surgery.importance.pipeline import score_source
    from surgery.importance.scorefile import save_scores

    t0 = time.perf_counter()
    say("scoring")
    scores = score_source(source, opts.data, SCORE_METHODS, tokens=opts.calib_tokens, seq_len=opts.calib_seq_len,
                          device=opts.device, status=say)
    score_path = save_scores(work / "scores.safetensors", scores)
    prelude["score"] = {"methods": SCORE_METHODS, "file": str(score_path), "tokens": scores.meta.tokens,
                        "data_fingerprint": scores.meta.data_fingerprint, "wall_s": round(time.perf_counter() - t0, 1)}
    return Path(score_path)


def _suggest(source: str, target_params: float, opts: CompressOptions, work: Path, score_path: Path, prelude: dict,
             say) -> dict:
    """Suggest the plan (+ the reconstruction's calibration), save it and return the pipeline document."""
    from surgery.plan import Reconstruct
    from surgery.suggest import Target, suggest_for_source

    t0 = time.perf_counter()
    say("suggesting a plan")
    s = suggest_for_source(source, [score_path], Target(params=target_params), uniform=not opts.non_uniform,
                           progress=say)
    plan = s.plan
    if opts.reconstruct:
        from surgery.reconstruct import calibrate_for_source

        say("adding the reconstruction step")
        # inputs from the original model and ridge 0.1: the best measured setting on the demo's 80% plans
        # (docs/benchmarks.md, "Recovery without training": 3.54x against 4.02x with the pruned prefix,
        # non-uniform; 4.81x against 6.58x uniform)
        plan = calibrate_for_source(plan, opts.data, tokens=opts.recon_tokens, seq_len=opts.recon_seq_len,
                                    reconstruct=Reconstruct(op="reconstruct", inputs="original", ridge=0.1))
    plan.save(work / "plan.json")
    prelude["suggest"] = {"plan": str(work / "plan.json"), "params_before": s.params_before,
                          "params_after": s.params_after, "uniform": not opts.non_uniform,
                          "reconstruct": opts.reconstruct, "wall_s": round(time.perf_counter() - t0, 1)}
    return build_pipeline(source, plan, opts)


def add_training_throughput(record: dict, opts: CompressOptions) -> None:
    """Give each training stage of the record its training tokens and tokens/s over the stage's wall time
    (loading and saving the models included, so a lower bound of the step rate)."""
    for entry, spec in zip(record["stages"], record["pipeline"]["stages"], strict=True):
        if "job" in spec and entry.get("wall_s"):
            entry["tokens"] = spec["job"]["steps"] * opts.batch_size * opts.seq_len
            entry["tokens_per_s"] = round(entry["tokens"] / entry["wall_s"], 1)
