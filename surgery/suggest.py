"""Scores -> a valid plan for a size target (`workbench plan suggest`).

A target is a fraction of parameters kept (`params`), and/or amounts per component (`heads`, `neurons`,
`layers`: a percentage or a count, removed). Choices follow the scores (higher = more important; lowest go first):

1. layers: the `layers` lowest-scored decoder layers are dropped;
2. query heads: per layer, the GQA-legal states are "keep m KV groups with k query heads each"; a state removes
   the heads outside the m best groups and, inside each kept group, all but its k best heads. Uniform (default):
   the same (m, k) in every layer, so the result keeps one shape and loads with plain transformers. Non-uniform:
   each layer gets its own state, allocated by a convex-hull greedy on (amount removed, score removed);
3. neurons: uniform: the same number, each layer's lowest; non-uniform: the globally lowest (each layer keeps one);
4. low rank (`low_rank` + `rank_keep`, optional): each named Linear of the kept layers at the rank keeping that
   fraction of its spectrum energy (sv), when that saves parameters; the named blocks are then not pruned
   (see surgery.importance.ranks). The m KV groups of step 2 can be ranked by a KV-group metric instead.

With `axes` (any of heads, neurons, layers, hidden, experts other than heads+neurons alone) the target is met
across those axes by score removed per parameter on one scale, the finest axis filling the rest against exact
counts: see surgery.importance.axes.

With `params` alone, attention and MLP give up the same fraction of their parameters (heads first, as close as
their coarse granularity allows without overshooting), then neurons fill the rest, so the result is within one
neuron step (one neuron per kept layer when uniform) of the target. The plan is checked with `resolve_plan`
and its exact parameter count comes from a meta-device model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import PlanError, UserError
from surgery.importance.allocate import Allocator
from surgery.importance.costs import layer_costs
from surgery.importance.layout import model_layout
from surgery.importance.ranks import check_keep
from surgery.importance.scorefile import ScoreFile, load_scores
from surgery.plan import ModelRef, Plan, parse_plan
from surgery.resolve import resolve_plan
from surgery.shapes import shape_from_config


@dataclass(frozen=True)
class Amount:
    """How much of a component to remove: a percentage of all of them, or a count (over the whole model)."""

    value: float
    percent: bool

    def count(self, total: int) -> int:
        return round(self.value / 100 * total) if self.percent else int(self.value)

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else str(int(self.value))


def parse_amount(text: str, what: str) -> Amount:
    """"25%" or "3" -> Amount; anything else is a UserError naming the option."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", str(text))
    if not m or (not m.group(2) and "." in m.group(1)):
        raise UserError(f"--{what} {text!r}: expected a percentage (25%) or a whole count (2)")
    value, percent = float(m.group(1)), bool(m.group(2))
    if percent and value >= 100:
        raise UserError(f"--{what} {text}: must stay below 100%")
    return Amount(value, percent)


@dataclass
class Target:
    """What to remove. `params`: fraction of all parameters kept, in (0, 1].

    `low_rank` (families "attn" / "mlp" or Linear names, see surgery.importance.ranks) with `rank_keep` (the
    fraction of each matrix's spectrum energy kept) adds low_rank steps; the blocks they name are not pruned. With
    the `sv_grad` rank metric, ranks are allocated globally instead: `rank_params` is the fraction of the selected
    matrices' parameters kept, or without it low rank alone meets `params`.
    """

    params: float | None = None
    heads: Amount | None = None
    neurons: Amount | None = None
    layers: Amount | None = None
    low_rank: tuple[str, ...] | None = None
    rank_keep: float | None = None
    # with the sv_grad rank metric: fraction of the --low-rank matrices' parameters kept (None: the whole target)
    rank_params: float | None = None
    serve: str | None = None  # "llama.cpp" / "vllm": only shapes that runtime runs without padding
    # "heads", "neurons", "layers", "hidden", "experts": meet `params` by score per parameter across these axes
    # (surgery.importance.axes); None or heads+neurons alone: the attention/MLP split below
    axes: tuple[str, ...] | None = None

    def describe(self) -> dict:
        def text(v):
            return v if isinstance(v, float) else ",".join(v) if isinstance(v, tuple) else str(v)

        return {k: text(v) for k, v in vars(self).items() if v is not None}


@dataclass
class Suggestion:
    """A suggested plan and what it does.

    Attributes:
        plan: the plan (model ref and provenance filled in).
        params_before, params_after: exact parameter counts (tied embeddings once).
        target_params: round(params_before * target.params), when a parameter target was given.
        granularity: parameters of the finest step used to approach the target.
        summary: layers_dropped, per original layer heads_removed, kv_groups_removed, neurons_removed; low_rank
            (module path -> rank) and low_rank_skipped (matrices whose rank would save nothing).
    """

    plan: Plan
    params_before: int
    params_after: int
    target_params: int | None
    granularity: int  # parameters of one neuron step: how close `params_after` can get to the target
    summary: dict = field(default_factory=dict)


def merge_scores(files: Sequence[ScoreFile], force: bool = False) -> ScoreFile:
    """One ScoreFile from several (same model and data unless forced; later files win on equal names)."""
    first = files[0]
    for other in files[1:]:
        other.check(model_fingerprint=first.meta.model_fingerprint, data_fingerprint=first.meta.data_fingerprint,
                    force=force)
    tensors = {k: v for f in files for k, v in f.tensors.items()}
    return ScoreFile(first.meta, tensors, first.path)


def suggest_plan(
    scores: ScoreFile | Sequence[ScoreFile],
    config_dict: dict,
    target: Target,
    *,
    uniform: bool = True,
    metrics: dict[str, str | None] | None = None,
    model: ModelRef | None = None,
    force: bool = False,
) -> Suggestion:
    """Build a plan for `target` from scores; always valid for the model (checked with resolve_plan).

    Args:
        scores: one score file or several for the same model (see merge_scores).
        config_dict: the model's config.json (shapes and parameter counts come from it; no weights read).
        target: what to remove (see Target).
        uniform: same cut in every layer (plain-transformers loadable); False lets each layer differ.
        metrics: {"heads": "head_grad", "neurons": ..., "layers": ..., "ranks": "sv", "hidden": "channel_taylor",
            "experts": "expert_grad"} to override the preferred metrics; "kv": a KV-group metric (kv_group_grad) choosing which KV groups a layer keeps.
        model: the ModelRef written into the plan.
        force: merge score files of other data.

    Raises:
        UserError: missing metrics, an unreachable or contradictory target.
    """
    from surgery.estimate import count_params, meta_model

    if target.params is not None and not 0 < target.params <= 1:
        raise UserError(f"--target-params {target.params}: expected the fraction of parameters kept, in (0, 1]")
    gradient = (metrics or {}).get("ranks") in ("sv_grad", "sv-grad") or target.rank_params is not None
    if target.low_rank is not None and gradient:
        if target.rank_keep is not None:
            raise UserError("--rank-keep is an energy fraction for sv / sv-act; sv-grad ranks are chosen for a "
                            "parameter budget: use --rank-params F (or --target-params alone)")
        if target.rank_params is not None and not 0 < target.rank_params < 1:
            raise UserError(f"--rank-params {target.rank_params}: expected the fraction of the --low-rank "
                            "matrices' parameters kept, in (0, 1)")
        if target.rank_params is None and target.params is None:
            raise UserError("--rank-metric sv-grad needs a budget: --rank-params F or --target-params F")
    elif (target.low_rank is None) != (target.rank_keep is None) or target.rank_params is not None:
        raise UserError("--low-rank and --rank-keep go together, e.g. --low-rank mlp --rank-keep 0.9 (or "
                        "--low-rank mlp --rank-metric sv-grad --rank-params 0.6)")
    if target.rank_keep is not None:
        check_keep(target.rank_keep)
    files = [scores] if isinstance(scores, ScoreFile) else list(scores)
    merged = merge_scores(files, force)
    skeleton = meta_model(config_dict)
    layout = model_layout(skeleton)
    costs = layer_costs(layout, count_params(skeleton))
    rules = None
    if target.serve is not None:
        from surgery.export.runtimes import serve_rules

        rules = serve_rules(target.serve, shape_from_config(config_dict), config_dict, uniform)
    if target.axes is not None and set(target.axes) != {"heads", "neurons"}:
        from surgery.importance.axes import AxesAllocator

        alloc = AxesAllocator(layout, costs, merged, target, uniform, metrics or {}, config_dict=config_dict,
                              rules=rules)
    else:
        alloc = Allocator(layout, costs, merged, target, uniform, metrics or {}, rules=rules)
    steps = alloc.run()
    provenance = {
        "tool": "workbench plan suggest",
        "target": target.describe(),
        "uniform": uniform,
        "metrics": alloc.used,
        "scores": [_describe(f) for f in files],
    }
    return finish_suggestion(steps, provenance, config_dict, target, model=model, rules=rules,
                             granularity=alloc.granularity, summary=alloc.summary)


def finish_suggestion(steps: list[dict], provenance: dict, config_dict: dict, target: Target, *,
                      model: ModelRef | None = None, rules=None, granularity: int = 0,
                      summary: dict | None = None) -> Suggestion:
    """Allocated steps -> a Suggestion: the plan (validated, never handed out invalid) with its exact counts."""
    from surgery.estimate import estimate

    plan = parse_plan({"version": 1, "steps": steps, "provenance": provenance,
                       **({"model": model.model_dump(exclude_none=True)} if model else {})})
    try:
        resolution = resolve_plan(plan, shape_from_config(config_dict))
    except PlanError as exc:  # ours, not the user's: never hand out a plan that does not validate
        raise RuntimeError(f"plan suggest built an invalid plan: {exc}") from None
    if rules is not None:
        _check_serves_unpadded(resolution, config_dict, rules.runtime)
    e = estimate(config_dict, resolution)  # exact counts from a meta-device model
    before, after = e.params_before, e.params_after
    target_params = round(before * target.params) if target.params is not None else None
    provenance = {**provenance, "params": {"before": before, "after": after, "target": target_params}}
    plan = plan.model_copy(update={"provenance": provenance})
    return Suggestion(plan, before, after, target_params, granularity, summary or {})


def check_removes_something(s: Suggestion, target: Target) -> None:
    """Refuse a suggestion that answers a parameter target with an empty plan (the front ends call it; the library
    hands empty plans back, e.g. the measured allocator's smallest single-axis points).

    Raises:
        UserError: The nearest plan to the target removes nothing; says the finest cut and the target it needs.
    """
    if s.plan.steps or target.params is None or target.params >= 1:
        return
    finest = ""
    if s.granularity:
        most = math.floor((1 - s.granularity / s.params_before) * 1e4) / 1e4
        finest = f" (the finest cut removes {s.granularity:,} params, {s.granularity / s.params_before:.2%}: ask " \
                 f"for at most {most:g})"
    raise UserError(f"--target-params {target.params:g}: the nearest plan removes nothing{finest}")


def _check_serves_unpadded(resolution, config_dict: dict, runtime: str) -> None:
    """Never hand out a `--serve` plan whose export would pad (that would be our bug, not the user's)."""
    from surgery.export.runtimes import runtime_fits, shape_after

    fit = next(f for f in runtime_fits(shape_after(resolution), config_dict) if f.runtime == runtime)
    if not fit.runs or fit.adjustments:
        raise RuntimeError(f"plan suggest --serve {runtime} built a plan its export would pad: {fit.line()}")


def _describe(f: ScoreFile) -> dict:
    m = f.meta
    out = {"methods": m.methods, "model_fingerprint": m.model_fingerprint, "data_fingerprint": m.data_fingerprint,
           "data_source": m.data_source, "tokens": m.tokens, "seq_len": m.seq_len}
    if f.path is not None:
        out["path"] = str(f.path)
    return {k: v for k, v in out.items() if v is not None}


def suggest_for_source(
    source: str | None,
    score_paths: Sequence[str | Path],
    target: Target,
    *,
    uniform: bool = True,
    metrics: dict[str, str | None] | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Suggestion:
    """`workbench plan suggest`: read the score files, check they belong to `source`, suggest a plan.

    Args:
        source: the model (None: the one the first score file names).
        score_paths: score files (safetensors) from `workbench score`.
        target, uniform, metrics: see suggest_plan.
        force: use scores computed for other weights (or, between several files, other data).
        progress: one-line status messages.

    Raises:
        ScoreMismatch: the scores were computed for other weights (unless `force`).
    """
    from surgery.loading import read_config

    resolved, files, ref = scores_for_source(source, score_paths, force=force, allow_pickle=allow_pickle,
                                             trust_remote_code=trust_remote_code, progress=progress)
    return suggest_plan(files, read_config(resolved), target, uniform=uniform, metrics=metrics, model=ref,
                        force=force)


def scores_for_source(source: str | None, score_paths: Sequence[str | Path], *, force: bool = False,
                      allow_pickle: bool = False, trust_remote_code: bool = False,
                      progress: Callable[[str], None] | None = None):
    """(resolved source, score files checked against its weights, ModelRef) for `plan suggest`."""
    from surgery.pipeline import source_fingerprint
    from surgery.sources import resolve_source

    if not score_paths:
        raise UserError("no scores: pass --scores FILE (from `workbench score`)")
    first = load_scores(score_paths[0], force=True)  # only to learn the model; checked below
    resolved = resolve_source(source or first.meta.model_source, allow_pickle=allow_pickle,
                              trust_remote_code=trust_remote_code, progress=progress)
    if progress:
        progress("fingerprinting weights")
    fingerprint = source_fingerprint(resolved)
    files = [load_scores(p, model_fingerprint=fingerprint, force=force) for p in score_paths]
    return resolved, files, ModelRef(source=resolved.original, fingerprint=fingerprint)
