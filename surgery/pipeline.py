"""End-to-end library calls behind `workbench plan validate` and `workbench apply` (no UI here).

validate: plan + source -> Resolution, fingerprint check, exact parameter counts before/after (from the headers, or a
model built on the meta device, so it reads no weights and costs no memory). apply: the same checks first, then
load, cut, save. Torch and transformers are imported only by what needs them: `plan validate` and the streaming
dry run of a 70B checkpoint run in tens of MB.
"""

from __future__ import annotations

import platform
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import FingerprintMismatch, UserError
from surgery.plan import Plan
from surgery.resolve import Resolution, resolve_plan
from surgery.shapes import shape_from_config
from surgery.sources import ResolvedSource, resolve_source

Progress = Callable[[str], None]
__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """Library versions recorded in every manifest."""
    import torch
    import transformers

    return {
        "workbench": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def source_fingerprint(resolved: ResolvedSource) -> str:
    """Fingerprint of the weights the user named: the .gguf file itself for GGUF sources, else the safetensors."""
    from surgery.fingerprint import weights_fingerprint

    return weights_fingerprint(resolved.gguf_file or resolved.path)


@dataclass
class Validation:
    """What `validate_for_source` found."""

    resolution: Resolution
    resolved: ResolvedSource
    fingerprint: str
    fingerprint_ok: bool | None  # None: the plan names no fingerprint
    params_before: int
    params_after: int
    warnings: list[str] = field(default_factory=list)

    @property
    def removed_fraction(self) -> float:
        return 1 - self.params_after / self.params_before if self.params_before else 0.0


def pick_source(plan: Plan, model: str | None) -> str:
    """--model wins; else the plan's own model block; else a clear error."""
    if model:
        return model
    if plan.model is not None:
        return plan.model.source
    raise UserError("the plan names no model: pass --model SOURCE")


def validate_for_source(
    plan: Plan,
    model: str | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> Validation:
    """Resolve the source, validate the plan against its config, check the fingerprint; reads no weights."""
    from surgery.inspect import check_config_against_weights
    from surgery.sources import read_config_file
    from surgery.stream.dry import exact_params

    resolved = resolve_source(
        pick_source(plan, model), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, progress=progress
    )
    config_dict = read_config_file(resolved.path)
    check_config_against_weights(resolved)  # a tampered config.json is refused before anything is sized by it
    resolution = resolve_plan(plan, shape_from_config(config_dict))
    if progress:
        progress("fingerprinting weights")
    fingerprint = source_fingerprint(resolved)
    expected = plan.model.fingerprint if plan.model else None
    ok = None if not expected else expected == fingerprint
    before, after = exact_params(resolved, config_dict, resolution)  # headers, or a meta-device model
    return Validation(resolution, resolved, fingerprint, ok, before, after, list(resolution.warnings))


def calibration_blocks(v: Validation, trust_remote_code: bool = False):
    """The plan's calibration tokens, checked (fingerprint, enough tokens) before any weight is read."""
    from surgery.loading import load_tokenizer
    from surgery.reconstruct import check_enough_tokens, load_calibration

    tokenizer = load_tokenizer(v.resolved, trust_remote_code=trust_remote_code)
    blocks = load_calibration(v.resolution.calibration, tokenizer)
    check_enough_tokens(v.resolution, blocks)
    return blocks


def apply_manifest(plan: Plan, v: Validation, params_after: int, force: bool, path: str) -> dict:
    """The manifest (surgery.json) of an apply; `path` says which applier ran ("stream" or "in_memory")."""
    return {
        "version": 1,
        "plan": plan.model_dump(mode="json", exclude_none=True),
        "input": {"source": v.resolved.original, "kind": v.resolved.kind, "fingerprint": v.fingerprint},
        "params": {"before": v.params_before, "after": params_after},
        "warnings": v.warnings,
        "forced": bool(force and v.fingerprint_ok is False),
        "versions": versions(),
        "command": " ".join(sys.argv[:1] + sys.argv[1:]) if sys.argv else "",
        "apply": {"path": path},
    }


@dataclass
class ApplyResult:
    out: Path
    validation: Validation
    manifest: dict


def apply_to_source(
    plan: Plan,
    out: str | Path,
    model: str | None = None,
    *,
    force: bool = False,
    overwrite: bool = False,
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    stream: bool | None = None,
    cancel: threading.Event | None = None,
) -> ApplyResult:
    """Validate, then load the model, apply the plan and write `out` atomically with its manifest.

    `stream`: True streams the plan from the input safetensors without building the model (surgery.stream; a plan
    that cannot stream is refused), False loads it, None (default) streams when the plan and source allow.
    `cancel`: checked between layers of the data-driven steps and while streaming (raises Cancelled /
    KeyboardInterrupt; nothing is left behind).

    Raises:
        FingerprintMismatch: the plan was made for other weights (unless `force`).
        PlanError / SourceError / UserError: bad input, found before any weight is read or anything written.
    """
    from surgery.apply import apply_resolution
    from surgery.estimate import count_params
    from surgery.export import check_output_dir, save_model_dir
    from surgery.export.atomic import refuse_replacing
    from surgery.loading import load_model

    out = Path(out)
    check_output_dir(out, overwrite)
    v = validate_for_source(plan, model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                            progress=progress)
    for protected in {v.resolved.path, v.resolved.gguf_file} - {None}:
        refuse_replacing(out, protected, "the source model")  # --overwrite never deletes the input
    if v.fingerprint_ok is False and not force:
        raise FingerprintMismatch(
            f"the plan was made for weights {plan.model.fingerprint[:19]}... but {v.resolved.original} has "
            f"{v.fingerprint[:19]}... (pass --force to apply anyway)"
        )
    if stream is not False:
        from surgery.stream.apply import stream_apply_source

        streamed = stream_apply_source(plan, v, out, required=bool(stream), dtype=dtype, overwrite=overwrite,
                                       force=force, trust_remote_code=trust_remote_code, progress=progress,
                                       cancel=cancel)
        if streamed is not None:
            return streamed
    blocks = calibration_blocks(v, trust_remote_code) if v.resolution.needs_data else None
    if progress:
        progress("loading weights")
    loaded = load_model(v.resolved, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if progress:
        progress("applying plan")
    data_report = None
    if blocks is not None:
        from surgery.reconstruct import apply_calibrated

        data_report = apply_calibrated(loaded.model, v.resolution, loaded.tokenizer, cancel=cancel,
                                       blocks=blocks).describe()
    else:
        apply_resolution(loaded.model, v.resolution)
    manifest = apply_manifest(plan, v, count_params(loaded.model), force, "in_memory")
    if data_report is not None:
        manifest["calibration"] = data_report
    if progress:
        progress("writing output")
    save_model_dir(loaded.model, out, tokenizer=loaded.tokenizer, manifest=manifest, overwrite=overwrite)
    return ApplyResult(out, v, manifest)
