"""The plan steps a session's journal cannot hold yet, kept as JSON in its UI state (key `plan_extras`).

The journal holds marks: heads, KV groups, neurons, layers and low-rank ranks. Width cuts (`prune_hidden`), expert
cuts (`prune_experts`), refits (`reconstruct`), the plan's calibration block and the data-driven low-rank methods
(whitened, asvd) are kept beside it, so that the session's whole plan (`SessionView.full_plan`: what the TUI shows,
`sessions export` writes and `sessions replay` applies) survives a restart. Undo reaches only the journaled marks.
"""

from __future__ import annotations

import json

from surgery.plan import DATA_RANK_METHODS, Plan, parse_plan

PLAN_EXTRAS_KEY = "plan_extras"
EXTRA_OPS = ("prune_hidden", "prune_experts", "reconstruct")


def split_plan(plan: Plan) -> tuple[Plan, str]:
    """(the marks a session journals, the rest as JSON for its UI state: "" when there is none)."""
    steps = [s.model_dump(exclude_none=True) for s in plan.steps]
    marks = parse_plan({"version": 1, "steps": [s for s in steps if s["op"] not in EXTRA_OPS]})
    extra = {"steps": [s for s in steps if s["op"] in EXTRA_OPS],
             "data_ranks": {s["module"]: {k: s[k] for k in ("method", "alpha") if k in s}
                            for s in steps if s.get("method") in DATA_RANK_METHODS}}
    if plan.calibration is not None:
        extra["calibration"] = plan.calibration.model_dump(exclude_none=True)
    if not (extra["steps"] or extra["data_ranks"] or plan.calibration is not None):
        return marks, ""
    return marks, json.dumps(extra, sort_keys=True)


def merge_plan_extras(plan: Plan, text: str | None) -> Plan:
    """A session's marks (`plan`) plus the extras `split_plan` kept; `plan` itself when there are none.

    Raises:
        PlanError, ValueError, TypeError, KeyError, AttributeError: The extras are not valid JSON / plan steps.
    """
    if not text:
        return plan
    extra = json.loads(text)
    ranks = {m: {"method": "whitened"} for m in extra.get("whitened") or ()}  # UI state of older sessions
    ranks.update(extra.get("data_ranks") or {})
    steps = [{**s, **ranks[s["module"]]} if s["op"] == "low_rank" and s["module"] in ranks else s
             for s in (x.model_dump(exclude_none=True) for x in plan.steps)]
    doc = {"version": 1, "steps": steps + list(extra.get("steps") or [])}
    if extra.get("calibration"):
        doc["calibration"] = extra["calibration"]
    merged = parse_plan(doc)
    return merged.model_copy(update={"model": plan.model, "provenance": plan.provenance})
