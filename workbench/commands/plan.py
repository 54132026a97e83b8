"""`workbench plan ...`: validate a plan against a model, print the plan file's JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from surgery.errors import PlanError, UserError
from surgery.plan import plan_json_schema, read_plan_json
from surgery.plan_check import check_plan_file
from workbench.cli_common import (
    AllowPickleOpt,
    JsonOpt,
    ModelOpt,
    TrustRemoteCodeOpt,
    err,
    fmt_int,
    out,
    print_json,
    status,
)

app = typer.Typer(no_args_is_help=True, help="Plan files: validate, schema.")

PlanArg = Annotated[Path, typer.Argument(help="Plan file (JSON).")]


def summary(v) -> dict:
    """Machine-readable summary of a validation."""
    shapes = v.resolution.result_shapes()
    return {
        "valid": v.fingerprint_ok is not False,
        "model": v.resolved.original,
        "fingerprint": v.fingerprint,
        "fingerprint_matches": v.fingerprint_ok,
        "layers_after": len(shapes),
        "params_before": v.params_before,
        "params_after": v.params_after,
        "removed_fraction": round(v.removed_fraction, 6),
        "warnings": v.warnings,
    }


def resolve_for(plan, source: str | None, allow_pickle: bool, trust_remote_code: bool):
    """The plan folded onto the config of `source` (no weights read)."""
    from surgery.resolve import resolve_plan
    from surgery.shapes import shape_from_config
    from surgery.sources import read_config_file, resolve_source

    if not source:
        raise UserError("the plan names no model: pass --model SOURCE")
    resolved = resolve_source(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return resolve_plan(plan, shape_from_config(read_config_file(resolved.path)))


@app.command("validate")
def validate(
    plan_file: PlanArg,
    model: ModelOpt = None,
    json_out: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Check a plan against a model without reading its weights; every problem is reported at once."""
    from surgery.jobs.pipeline import is_pipeline_file
    from surgery.pipeline import validate_for_source  # torch-free where the headers suffice (surgery.stream.dry)

    data = read_plan_json(plan_file)  # once: the file may be a pipe
    if is_pipeline_file(data):  # its plan-schema errors ("kind: unknown field") would not say what is wrong
        _validate_pipeline(plan_file, data, json_out)
        return
    report = check_plan_file(plan_file, lambda plan, named: resolve_for(plan, model or named, allow_pickle,
                                                                         trust_remote_code), data)
    if not report.valid:  # every problem at once, in file order; --json says so on stdout too
        if json_out:
            print_json({"valid": False, "problems": report.problems, "warnings": report.warnings})
        raise PlanError(report.problems)
    plan = report.plan
    with status(not json_out) as progress:
        v = validate_for_source(plan, model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                progress=progress)
    if v.fingerprint_ok is False:
        raise PlanError([
            f"model.fingerprint: the plan was made for {plan.model.fingerprint[:19]}... but "
            f"{v.resolved.original} has {v.fingerprint[:19]}... (apply with --force to override)"
        ])
    if json_out:
        print_json(summary(v))
        return
    for w in v.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    out.print(
        f"[green]valid[/]: {len(plan.steps)} step(s) on {v.resolved.original}; params {fmt_int(v.params_before)} -> "
        f"{fmt_int(v.params_after)} ({v.removed_fraction:.1%} removed), {len(v.resolution.result_shapes())} layers"
    )


def _validate_pipeline(path: Path, data: dict, json_out: bool) -> None:
    """A pipeline file: every stage and training job field checked (what `workbench apply` would run)."""
    from surgery.jobs.pipeline import parse_pipeline

    pipe = parse_pipeline(data, str(path))  # UserError: one line, exit 2
    stages = [s.stage for s in pipe.stages]
    if json_out:
        print_json({"valid": True, "kind": "pipeline", "stages": stages})
        return
    out.print(f"[green]valid[/] pipeline: {len(stages)} stage(s) ({' -> '.join(stages)}) on {pipe.model.source}; "
              f"run it with: workbench apply {path} --out DIR")


@app.command("schema")
def schema() -> None:
    """Print the JSON Schema of plan files."""
    print(json.dumps(plan_json_schema(), indent=2, sort_keys=True))
