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


def _train(pipeline: Pipeline, stage, i: int, teacher: str, student: str, out: Path, jobs_root: Path) -> dict:
    from surgery.distill.config import parse_config
    from surgery.jobs.worker import run_new_job

    cfg = parse_config(_job_doc(pipeline, stage, teacher, student, str(out)), f"stages[{i}].job")
    cfg = cfg.with_paths_from(Path.cwd())  # the job file must stand alone (a later resume runs elsewhere)
    job, code, events, _ = run_new_job(jobs_root, cfg.to_json())
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


def run_pipeline(pipeline: Pipeline, out: str | Path, *, jobs_root: Path, overwrite: bool = False,
                 progress=None, prelude: dict | None = None) -> dict:
    """Run every stage in order and write the final model + pipeline.json to `out` (atomically).

    Intermediate models stay in `<jobs_root>/pipeline-<id>/stage-<i>-<name>/` for inspection; each training stage
    is a job in `jobs_root`. Each stage's record gets its wall time and, with an `eval` spec, the metrics of its
    output (`after`; the previous stage's `after`, or the base model's, is its before). `prelude` (what a front
    end did before the pipeline, e.g. `workbench compress`'s scoring) is stored as is. Returns the record
    written to `out/pipeline.json`.

    Raises:
        UserError: Bad input in any stage (found before the stage starts), or a failed training stage.
    """
    from surgery.export import check_output_dir
    from surgery.pipeline import apply_to_source, source_fingerprint
    from surgery.plan import parse_plan
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

    work = Path(jobs_root) / new_job_id("pipeline")
    work.mkdir(parents=True)
    import time

    current, stages = base, []
    say("measuring the base model")
    before = _metrics(str(resolved.path), pipeline.eval, base)
    for i, stage in enumerate(pipeline.stages):
        target = work / f"stage-{i}-{stage.stage}"
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
            entry = {"stage": stage.stage, **_train(pipeline, stage, i, teacher, student, target, Path(jobs_root))}
        entry["wall_s"] = round(time.perf_counter() - t0, 1)
        current = str(target)
        if pipeline.eval is not None or i == len(pipeline.stages) - 1:
            say(f"measuring stage {i}")
            entry["after"] = _metrics(current, pipeline.eval, base)
        stages.append(entry)
    record = {
        "version": 1,
        "pipeline": pipeline.model_dump(mode="json", exclude_none=True),
        "base": {"source": base, "fingerprint": fingerprint},
        "stages": stages,
        "metrics": {"before": before, "after": stages[-1]["after"]},
    }
    if prelude is not None:
        record["prelude"] = prelude
    _publish(Path(current), out, record)
    return record


def _publish(final: Path, out: Path, record: dict) -> None:
    """Copy the final model to `out` with the record, via a temporary sibling renamed into place (`out` was checked
    when the pipeline started; whatever is there now is replaced)."""
    from surgery.export import atomic_dir
    from surgery.plan import write_text_atomic

    with atomic_dir(out, overwrite=True) as tmp:
        shutil.copytree(final, tmp, dirs_exist_ok=True)
        write_text_atomic(tmp / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
