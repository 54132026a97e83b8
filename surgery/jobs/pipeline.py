"""The distill -> prune -> redistill pipeline as one replayable file, run headlessly.

    {"version": 1, "kind": "pipeline", "model": {"source": "smollm2-135m"}, "seed": 0,
     "defaults": {"data": "../shared/data/tinyshakespeare/input.txt", "seq_len": 256, "batch_size": 4},
     "eval": {"data": "../shared/data/wikitext-2-raw/wiki.test.raw", "tokens": 8192},
     "stages": [
       {"stage": "distill", "student": {"layers": [0, 2, 4, 6]}, "job": {"steps": 300, "losses": {"kl": 1.0}}},
       {"stage": "prune", "steps": [{"op": "prune_heads", "layer": 1, "heads": [0, 3]}]},
       {"stage": "redistill", "job": {"steps": 100}}
     ]}

Stages run in order on "the current model" (the base model at first). `distill` trains a student built from the
teacher (a layer subset, a smaller config initialised from the seed, or an existing source); `prune` applies plan
steps whose indices name the current model's components; `redistill` trains the current model from a teacher
("base" = the unpruned base model, the default). Training stages are ordinary jobs (`surgery.jobs`), run in this
process, so each has its event log and data fingerprint. The output directory gets the final model plus
`pipeline.json`: the stages, their jobs and data fingerprints, and a before/after metrics record (perplexity,
parameters). Same file, same seeds, CPU deterministic mode: the same output weights, byte for byte.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from surgery.errors import UserError
from surgery.plan import Calibration, ModelRef, Step

PIPELINE_VERSION = 1
RECORD = "pipeline.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudentSpec(_Strict):
    """How a `distill` stage makes its student: exactly one of source, layers, config."""

    source: str | None = Field(default=None, description="an existing model")
    layers: list[int] | None = Field(default=None, min_length=1, description="teacher blocks to keep")
    config: dict[str, Any] | None = Field(default=None, description="teacher config overrides, seeded init")

    @model_validator(mode="after")
    def _one(self) -> StudentSpec:
        if sum(x is not None for x in (self.source, self.layers, self.config)) != 1:
            raise ValueError("a student needs exactly one of: source, layers, config")
        return self


class DistillStage(_Strict):
    stage: Literal["distill"]
    teacher: str = Field(default="current", description="'base', 'current' or a model source")
    student: StudentSpec
    job: dict[str, Any] = Field(default_factory=dict, description="job-file fields for this stage")


class PruneStage(_Strict):
    stage: Literal["prune"]
    steps: list[Step] = Field(min_length=1)
    calibration: Calibration | None = Field(default=None, description="calibration text of data-driven steps "
                                            "(reconstruct, whitened low_rank), as in a plan file")


class RedistillStage(_Strict):
    stage: Literal["redistill"]
    teacher: str = Field(default="base", description="'base', 'current' or a model source")
    job: dict[str, Any] = Field(default_factory=dict)


Stage = Annotated[Union[DistillStage, PruneStage, RedistillStage], Field(discriminator="stage")]


class EvalSpec(_Strict):
    data: str
    tokens: int | None = Field(default=None, ge=2)
    seq_len: int = Field(default=256, ge=2)
    batch_size: int = Field(default=1, ge=1)


class Pipeline(_Strict):
    """A pipeline file (version 1)."""

    version: int = PIPELINE_VERSION
    kind: Literal["pipeline"] = "pipeline"
    model: ModelRef
    seed: int = 0
    defaults: dict[str, Any] = Field(default_factory=dict, description="job-file fields for every training stage")
    eval: EvalSpec | None = None
    stages: list[Stage] = Field(min_length=1)


def is_pipeline_file(data: Any) -> bool:
    """Whether a decoded JSON document is a pipeline (front ends use it to route `apply`)."""
    return isinstance(data, dict) and data.get("kind") == "pipeline"


def parse_pipeline(data: Any, where: str = "pipeline") -> Pipeline:
    """Validate a decoded pipeline file, including every training stage's job fields.

    Raises:
        UserError: A newer version, an unknown field, a bad stage (all problems on one line).
    """
    from surgery.distill.config import parse_config

    if isinstance(data, dict) and isinstance(data.get("version"), int) and data["version"] > PIPELINE_VERSION:
        raise UserError(f"{where} is version {data['version']}, newer than this workbench reads "
                        f"(version {PIPELINE_VERSION}): upgrade the workbench")
    try:
        pipeline = Pipeline.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors()]
        raise UserError(f"{where}: " + "; ".join(problems)) from None
    for i, stage in enumerate(pipeline.stages):
        if stage.stage != "prune":  # every job field checked now, not hours later when the stage starts
            parse_config(_job_doc(pipeline, stage, "teacher", "student", "out"), f"{where}: stages[{i}].job")
    return pipeline


def load_pipeline(path: str | Path) -> Pipeline:
    from surgery.jsonfile import read_json_file

    path = Path(path)
    return parse_pipeline(read_json_file(path, "pipeline"), str(path))


def _job_doc(pipeline: Pipeline, stage, teacher: str, student: str, out: str) -> dict:
    doc = {"seed": pipeline.seed, **pipeline.defaults, **stage.job}
    doc.update(version=1, kind="distill", teacher=teacher, student=student, out=out, overwrite=True)
    return doc


def _make_student(spec: StudentSpec, teacher: str, target: Path, seed: int) -> str:
    """A student source for a distill stage (written under `target` when it has to be built)."""
    if spec.source is not None:
        return spec.source
    from surgery.loading import load_model, read_config
    from surgery.plan import parse_plan
    from surgery.shapes import shape_from_config
    from surgery.sources import resolve_source

    resolved = resolve_source(teacher)
    if spec.layers is not None:
        from surgery.pipeline import apply_to_source

        n = shape_from_config(read_config(resolved)).num_layers
        bad = [i for i in spec.layers if not 0 <= i < n]
        if bad:
            raise UserError(f"student layers {bad} do not exist in the teacher ({n} layers, 0-{n - 1})")
        drop = [i for i in range(n) if i not in set(spec.layers)]
        if not drop:
            return teacher
        apply_to_source(parse_plan({"version": 1, "steps": [{"op": "drop_layers", "layers": drop}]}), target,
                        teacher, overwrite=True, dtype="float32")
        return str(target)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgery.export import save_model_dir

    config_dict = {**read_config(resolved), **spec.config}
    try:
        config = AutoConfig.for_model(**config_dict)
    except (TypeError, ValueError) as exc:
        raise UserError(f"student config overrides are not a valid config: {exc}") from None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    tokenizer = load_model(str(resolved.path)).tokenizer
    save_model_dir(model, target, tokenizer=tokenizer, overwrite=True)
    return str(target)


class PipelineCancelled(Exception):
    """A training stage's job ended `cancelled` (a cancel request or SIGTERM reached it): the pipeline stops there,
    its finished stages and the job's checkpoint kept for a resume."""

    def __init__(self, stage: int, job: str, checkpoint: str | None):
        super().__init__(f"stage {stage} cancelled (job {job}, checkpoint {checkpoint or 'none'})")
        self.stage, self.job, self.checkpoint = stage, job, checkpoint


def _train(pipeline: Pipeline, stage, i: int, teacher: str, student: str, out: Path, jobs_root: Path,
           progress: dict, save_progress: Callable[[], None], on_job: Callable | None) -> dict:
    """Run stage `i`'s job in this process; a job recorded in `progress` by an earlier attempt is continued from
    its newest checkpoint (or, when it finished, only its output is taken) instead of starting over."""
    from surgery.distill.config import parse_config
    from surgery.jobs.events import last_final, read_events
    from surgery.jobs.store import JobDir, create_job
    from surgery.jobs.worker import _output_owned_by, run_job

    cfg = parse_config(_job_doc(pipeline, stage, teacher, student, str(out)), f"stages[{i}].job")
    cfg = cfg.with_paths_from(Path.cwd())  # the job file must stand alone (a later resume runs elsewhere)
    known = progress["jobs"].get(str(i))
    job = JobDir(Path(jobs_root) / known) if known and (Path(jobs_root) / known / "job.json").is_file() else None
    if job is None:
        job = create_job(jobs_root, cfg.to_json())
        progress["jobs"][str(i)] = job.id
        save_progress()  # before it runs: a resume after SIGKILL finds this job and its checkpoints
    events = read_events(job.events_file)[0]
    final = last_final(events) or {}
    if not (final.get("event") == "done" and _output_owned_by(out, job.id)):
        job.cancel_file.unlink(missing_ok=True)  # the request that stopped an earlier attempt is spent
        if on_job is not None:
            on_job(job)  # a front end forwards cancel requests to it (and may refuse to start it)
        try:
            code = run_job(job.path)
        finally:
            if on_job is not None:
                on_job(None)
        events = read_events(job.events_file)[0]
        final = last_final(events) or {}
        if final.get("event") == "cancelled":
            raise PipelineCancelled(i, job.id, final.get("checkpoint"))
        if code != 0:
            raise UserError(f"stage {i} ({stage.stage}) failed: {events[-1].get('error', 'see its log')} "
                            f"(log: {job.events_file})")
    start = next(e for e in events if e["event"] == "start")
    return {"job": job.id, "events": str(job.events_file), "teacher": teacher, "student": student,
            "data": start["train"], "output": str(out)}


def _metrics(source: str, spec: EvalSpec | None, tokenizer_source: str) -> dict:
    from surgery.data import load_blocks
    from surgery.loading import load_model
    from surgery.estimate import count_params

    loaded = load_model(source)
    record: dict[str, Any] = {"source": source, "params": count_params(loaded.model)}
    if spec is not None:
        from surgery.metrics.perplexity import perplexity

        tok = loaded.tokenizer or load_model(tokenizer_source).tokenizer
        blocks = load_blocks(spec.data, tok, spec.seq_len, spec.tokens)
        result = perplexity(loaded.model, blocks, batch_size=spec.batch_size)
        record.update(perplexity=result.perplexity, eval_data=blocks.describe())
    return record


PROGRESS = "progress.json"  # in a pipeline's work directory: what a resume reuses


def run_pipeline(pipeline: Pipeline, out: str | Path, *, jobs_root: Path, overwrite: bool = False,
                 progress=None, prelude: dict | None = None, work: str | Path | None = None,
                 on_job: Callable | None = None) -> dict:
    """Run every stage in order and write the final model + pipeline.json to `out` (atomically).

    Intermediate models stay in the work directory (`work`, else `<jobs_root>/pipeline-<id>/`) as
    `stage-<i>-<name>/` for inspection; each training stage is a job in `jobs_root`. Each stage's record gets its
    wall time and, with an `eval` spec, the metrics of its output (`after`; the previous stage's `after`, or the
    base model's, is its before). `prelude` (what a front end did before the pipeline, e.g. `workbench
    compress`'s scoring) is stored as is. Returns the record written to `out/pipeline.json`.

    Resume: the work directory's progress.json records the base metrics, each finished stage and each training
    stage's job id as soon as it exists. Run again with the same `work` (same pipeline), finished stages are
    reused as they are, and an interrupted training stage continues its job from the newest checkpoint, so the
    result is the uninterrupted run's. `on_job(job)` is called before a training stage's job runs here and
    `on_job(None)` after it (a front end forwards cancel requests to it).

    Raises:
        UserError: Bad input in any stage (found before the stage starts), a failed training stage, or a `work`
            directory made for another pipeline.
        PipelineCancelled: A training stage's job was cancelled (it checkpointed first).
    """
    from surgery.export import check_output_dir
    from surgery.pipeline import apply_to_source, source_fingerprint
    from surgery.plan import parse_plan, write_text_atomic
    from surgery.sources import resolve_source

    out = Path(out)
    check_output_dir(out, overwrite)
    say = progress or (lambda _m: None)
    base = pipeline.model.source
    resolved = resolve_source(base)
    fingerprint = source_fingerprint(resolved)
    if pipeline.model.fingerprint and pipeline.model.fingerprint != fingerprint:
        raise UserError(f"the pipeline was made for weights {pipeline.model.fingerprint[:19]}... but {base} has "
                        f"{fingerprint[:19]}...")
    from surgery.jobs.store import new_job_id

    work = Path(work) if work is not None else Path(jobs_root) / new_job_id("pipeline")
    work.mkdir(parents=True, exist_ok=True)
    spec = pipeline.model_dump(mode="json", exclude_none=True)
    state = _read_progress(work, spec)

    def save_progress() -> None:
        write_text_atomic(work / PROGRESS, json.dumps(state, indent=2, sort_keys=True) + "\n")

    import time

    current, stages = base, []
    if state.get("before") is None:
        say("measuring the base model")
        state["before"] = _metrics(str(resolved.path), pipeline.eval, base)
        save_progress()
    else:
        say("measuring the base model: done before, reused")
    before = state["before"]
    for i, stage in enumerate(pipeline.stages):
        target = work / f"stage-{i}-{stage.stage}"
        if i < len(state["stages"]) and Path(state["stages"][i]["output"]).is_dir():
            say(f"stage {i}: {stage.stage}: done before, reused ({target})")
            entry = state["stages"][i]
            stages.append(entry)
            current = entry["output"]
            continue
        say(f"stage {i}: {stage.stage}")
        t0 = time.perf_counter()
        if stage.stage == "prune":
            doc = {"version": 1, "steps": [s.model_dump(mode="json", exclude_none=True) for s in stage.steps]}
            if stage.calibration is not None:
                doc["calibration"] = stage.calibration.model_dump(mode="json", exclude_none=True)
            apply_to_source(parse_plan(doc), target, current, overwrite=True, dtype="float32")
            entry = {"stage": "prune", "input": current, "output": str(target), "steps": len(stage.steps)}
        else:
            teacher = {"base": base, "current": current}.get(stage.teacher, stage.teacher)
            if stage.stage == "distill":
                student = _make_student(stage.student, teacher, work / f"stage-{i}-student-init",
                                        pipeline.seed + i)
            else:
                student = current
            entry = {"stage": stage.stage, **_train(pipeline, stage, i, teacher, student, target, Path(jobs_root),
                                                    state, save_progress, on_job)}
        entry["wall_s"] = round(time.perf_counter() - t0, 1)
        current = str(target)
        if pipeline.eval is not None or i == len(pipeline.stages) - 1:
            say(f"measuring stage {i}")
            entry["after"] = _metrics(current, pipeline.eval, base)
        stages.append(entry)
        state["stages"] = stages[:]
        save_progress()
    record = {
        "version": 1,
        "pipeline": spec,
        "base": {"source": base, "fingerprint": fingerprint},
        "stages": stages,
        "metrics": {"before": before, "after": stages[-1]["after"]},
    }
    if prelude is not None:
        record["prelude"] = prelude
    _publish(Path(current), out, record)
    return record


def _read_progress(work: Path, spec: dict) -> dict:
    """The work directory's progress (empty for a new one).

    Raises:
        UserError: It was written for another pipeline (its stages would not be this pipeline's).
    """
    from surgery.jsonfile import read_json_file

    if not (work / PROGRESS).is_file():
        return {"pipeline": spec, "before": None, "stages": [], "jobs": {}}
    state = read_json_file(work / PROGRESS, "pipeline progress")
    if not isinstance(state, dict) or state.get("pipeline") != spec:
        raise UserError(f"{work} holds the progress of another pipeline: resume with the same pipeline file, or "
                        "use a new work directory")
    return state


def _publish(final: Path, out: Path, record: dict) -> None:
    """Copy the final model to `out` with the record, via a temporary sibling renamed into place (`out` was checked
    when the pipeline started; whatever is there now is replaced)."""
    from surgery.export import atomic_dir
    from surgery.plan import write_text_atomic

    with atomic_dir(out, overwrite=True) as tmp:
        shutil.copytree(final, tmp, dirs_exist_ok=True)
        write_text_atomic(tmp / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
