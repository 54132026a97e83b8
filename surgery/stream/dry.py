"""`apply --dry-run` and the parameter counts of `plan validate`, from config.json and the headers: no torch.

Both ask `surgery.stream.layout` first (seconds and tens of MB on a 70B header set); where it does not cover the
checkpoint they fall back to the meta-device model (torch + transformers) and say so (`notes`).
"""

from __future__ import annotations

from pathlib import Path

from surgery.inspect import check_config_against_weights
from surgery.plan import Plan
from surgery.resolve import Resolution
from surgery.stream.blockers import plan_blockers
from surgery.stream.files import StreamPlan, assemble
from surgery.stream.fitted import fitted_modules, spill_groups
from surgery.stream.layout import NotCovered, output_state
from surgery.stream.reads import NotStreamable
from surgery.stream.source import SourceTensor, tensor_locations

FALLBACK = "planned on a meta-device model (torch + transformers): the header-only planner does not cover "


def header_stream_plan(
    source_dir: Path, config_dict: dict, resolution: Resolution, dtype: str = "auto", max_shard_size: str = "5GB",
    sources: dict[str, SourceTensor] | None = None,
) -> StreamPlan:
    """The StreamPlan of a structural plan from config + headers alone (no torch, no model; `model` is None).

    Raises:
        NotCovered: The header-only planner does not handle this checkpoint or plan.
        NotStreamable: Some output tensor has no slice of the input behind it.
    """
    sources = tensor_locations(source_dir) if sources is None else sources
    state = output_state(config_dict, resolution, sources, dtype)
    return assemble(state, resolution, sources, max_shard_size, planned_by="headers")


def any_stream_plan(
    source_dir: Path, config_dict: dict, resolution: Resolution, dtype: str = "auto", max_shard_size: str = "5GB"
) -> StreamPlan:
    """`header_stream_plan`, or the meta-device one (with a note saying why) where the headers do not suffice."""
    sources = tensor_locations(source_dir)
    try:
        return header_stream_plan(source_dir, config_dict, resolution, dtype, max_shard_size, sources)
    except NotCovered as e:
        from surgery.loading import parse_dtype
        from surgery.stream.apply import build_stream_plan

        splan = build_stream_plan(source_dir, config_dict, resolution, parse_dtype(dtype, config_dict),
                                  max_shard_size, sources)
        splan.notes.append(FALLBACK + str(e))
        return splan


def exact_params(resolved, config_dict: dict, resolution: Resolution) -> tuple[int, int]:
    """(parameters before, after) the plan: from the headers when `surgery.stream.layout` covers the checkpoint
    (no torch), else on a meta-device model: `surgery.estimate.estimate`, given the directory where the headers
    may be counted. Both are exact."""
    from surgery.estimate import estimate

    headers = not resolved.pickle_weights and not resolution.needs_data
    e = estimate(config_dict, resolution, source_dir=resolved.path if headers else None)
    return e.params_before, e.params_after


def mark_fitted(report: dict, splan: StreamPlan, resolution: Resolution) -> dict:
    """`report` (`splan`'s streaming dry run) with `"fitted": true` on each read whose tensor the data steps compute
    at apply time (the tensors the streaming apply spills: `spill_groups`), and a note saying so: its row shows the
    cut of the input the fit starts from (shape and bytes are the output's), not the bytes written (those come from
    the calibration text, surgery.stream.datasteps).

    Raises:
        NotStreamable: A fitted module has no tensor in the output (as the streaming apply would).
    """
    groups = spill_groups(splan, resolution)
    if not groups:
        return report
    names = {t.name for group in groups.values() for t in group}
    fitted = [r for r in report["reads"] if r["name"] in names]
    for r in fitted:
        r["fitted"] = True
    spec = resolution.shape.spec
    modules = sorted({rel for cut in resolution.kept_layers for rel in fitted_modules(cut, spec)})
    report["notes"].append(
        f"{len(fitted)} tensors ({', '.join(modules)} in {len(groups)} layers, marked fitted) "
        "are replaced at apply time by the data steps' fit on the calibration text: their rows show the input "
        "they are cut from, the bytes written come from the fit (same shapes and sizes)")
    return report


def dry_run_source(
    plan: Plan,
    model: str | None = None,
    *,
    stream: bool | None = None,
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    max_shard_size: str = "5GB",
) -> dict:
    """What `apply` would read and write, from config and safetensors headers alone (no weight byte is read, the
    fingerprint is not computed): `StreamPlan.describe()`, or {"path": "in_memory", "why": [...]} when the plan
    cannot stream.

    Raises:
        NotStreamable: `stream` is True and the plan cannot stream.
        PlanError / SourceError: as `apply`.
    """
    from surgery.pipeline import pick_source
    from surgery.resolve import resolve_plan
    from surgery.shapes import shape_from_config
    from surgery.sources import read_config_file, resolve_source

    resolved = resolve_source(pick_source(plan, model), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    config_dict = read_config_file(resolved.path)
    check_config_against_weights(resolved)
    resolution = resolve_plan(plan, shape_from_config(config_dict))
    reasons = plan_blockers(plan, pickle_weights=resolved.pickle_weights, trust_remote_code=trust_remote_code)
    if stream is False:
        reasons.insert(0, "--no-stream")
    if not reasons:
        try:
            splan = any_stream_plan(resolved.path, config_dict, resolution, dtype, max_shard_size)
            return mark_fitted({"source": str(resolved.path), "warnings": resolution.warnings, **splan.describe()},
                               splan, resolution)
        except NotStreamable as e:
            reasons.append(str(e))
    if stream:
        raise NotStreamable(f"cannot stream: {reasons[0]} (run without --stream to apply in memory)")
    return {"source": str(resolved.path), "warnings": resolution.warnings, "path": "in_memory", "why": reasons}
