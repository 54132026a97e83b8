"""`plan validate`'s full report: schema problems AND the model problems of the steps that did parse, in order.

`load_plan` stops at the first layer of checks: a plan with one misspelt field never reaches the resolver, so its
GQA violations, out-of-range layers and rank mistakes stay hidden until the typo is fixed. Here every step that
parses on its own is still resolved against the model, and the resolver's step numbers are mapped back to the
file's, so one run names every problem, sorted by where it is in the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.errors import PlanError, UserError
from surgery.plan import Plan, parse_plan, read_plan_json

_STEP = re.compile(r"steps\[(\d+)\]")


@dataclass
class PlanReport:
    """Every problem and warning of a plan file, ordered by position in the file (plan-level ones first)."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    plan: Plan | None = None  # the whole plan, when its schema is valid

    @property
    def valid(self) -> bool:
        return not self.problems


def position(message: str) -> tuple[int, int, str]:
    """Sort key: plan-level fields first, then by the first step index the message names, then the text."""
    m = _STEP.search(message)
    return (1, int(m.group(1)), message) if m else (0, 0, message)


def ordered(messages: list[str]) -> list[str]:
    return sorted(dict.fromkeys(messages), key=position)


def _renumber(message: str, index: list[int]) -> str:
    """Resolver messages name steps of the salvaged plan; give them the file's numbers."""
    return _STEP.sub(lambda m: f"steps[{index[int(m.group(1))]}]", message)


def salvage(data: Any) -> tuple[Plan | None, list[int]]:
    """The steps of a schema-invalid plan that parse on their own, as a plan, with their indices in the file."""
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        return None, []
    steps, index = [], []
    for i, step in enumerate(data["steps"]):
        try:
            parse_plan({"version": 1, "steps": [step]})
        except PlanError:
            continue
        steps.append(step)
        index.append(i)
    extra = {}
    for key in ("calibration",):  # the resolver reads it; keep it when it parses
        try:
            parse_plan({"version": 1, key: data.get(key)})
            extra[key] = data.get(key)
        except PlanError:
            pass
    return parse_plan({"version": 1, "steps": steps, **extra}), index


def model_named(data: Any) -> str | None:
    """The model source a (possibly invalid) plan names."""
    model = data.get("model") if isinstance(data, dict) else None
    source = model.get("source") if isinstance(model, dict) else None
    return source if isinstance(source, str) and source else None


def check_plan_file(path: str | Path, resolve: Callable[[Plan, str | None], Any], data: Any = None) -> PlanReport:
    """Read a plan file and report every problem at once.

    Args:
        path: the plan file.
        data: its decoded JSON when the caller has read it already (a pipe can be read only once).
        resolve: (plan, model source the file names or None) -> Resolution against the model (raises PlanError
            or UserError); called with the whole plan when its schema is valid, else with the steps that parse.

    Raises:
        UserError: the file is missing or not JSON (nothing else can be checked then).
    """
    path = Path(path)
    if data is None:
        data = read_plan_json(path)  # index lists packed as they are decoded (surgery.indices)
    report = PlanReport()
    try:
        report.plan = parse_plan(data)
        target, index = report.plan, list(range(len(report.plan.steps)))
    except PlanError as exc:
        report.problems += exc.problems
        target, index = salvage(data)
    if target is not None:
        try:
            resolution = resolve(target, model_named(data))
            report.warnings += [_renumber(w, index) for w in resolution.warnings]
        except PlanError as exc:
            report.problems += [_renumber(p, index) for p in exc.problems]
        except UserError as exc:  # e.g. an unsupported family: one problem, not a crash
            report.problems.append(str(exc))
    report.problems = [f"{path}: {p}" for p in ordered(report.problems)]
    report.warnings = ordered(report.warnings)
    return report
