"""A session's model reference: describe a source once, and check a plan against (possibly different) weights.

A session stores its model by source, weights fingerprint and config.json. Opening it against other weights is
allowed (a re-distilled student, a copy on another box) but must not be silent: `check_model` says whether the
fingerprint matches and re-validates the plan against the new config with `surgery.resolve.resolve_plan`.
Nothing here reads weights beyond hashing them (cached), and nothing imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sessions.model import SessionModel
from surgery.errors import PlanError, UserError
from surgery.plan import Plan


@dataclass
class ModelCheck:
    """The outcome of checking a session's plan against a model.

    Attributes:
        same_weights: True / False when both fingerprints are known, None otherwise.
        expected: The session's fingerprint.
        actual: The fingerprint of the model checked against.
        problems: Every reason the plan does not fit the model's shapes (empty: it fits).
        warnings: Validation warnings (e.g. a low rank that saves nothing).
    """

    same_weights: bool | None
    expected: str | None
    actual: str | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def plan_fits(self) -> bool:
        return not self.problems

    def messages(self) -> list[str]:
        """One line per thing the user should know, empty when all is well."""
        out: list[str] = []
        if self.same_weights is False:
            out.append(f"the session was made for weights {str(self.expected)[:19]}... but this model has "
                       f"{str(self.actual)[:19]}...; the plan was re-validated against it")
        out += [f"plan does not fit: {p}" for p in self.problems]
        return out


def describe_source(
    source: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> SessionModel:
    """Resolve a model source and record what a session needs about it (path, fingerprint, config.json).

    Directories and .gguf files are stored as absolute paths, so the session works from any directory.

    Raises:
        SourceError: The source cannot be found, read or converted.
    """
    from surgery.fingerprint import weights_fingerprint
    from surgery.sources import read_config_file, resolve_source

    resolved = resolve_source(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                              progress=progress)
    config = read_config_file(resolved.path)
    if progress:
        progress("fingerprinting weights")
    fingerprint = weights_fingerprint(resolved.gguf_file or resolved.path)
    if resolved.kind == "gguf":
        text = str(resolved.gguf_file)
    elif resolved.kind == "hf_dir":
        text = str(resolved.path)
    else:
        text = resolved.original
    return SessionModel(source=text, kind=resolved.kind, fingerprint=fingerprint, config=config)


def validate_steps(plan: Plan, config: dict) -> tuple[list[str], list[str]]:
    """Validate a plan against a config.json dict without raising.

    Returns:
        (problems, warnings); an unsupported family is reported as one problem.
    """
    from surgery.resolve import resolve_plan
    from surgery.shapes import shape_from_config

    try:
        resolution = resolve_plan(plan, shape_from_config(config))
    except PlanError as exc:
        return list(exc.problems), []
    except UserError as exc:
        return [str(exc)], []
    return [], list(resolution.warnings)


def check_model(session_model: SessionModel, plan: Plan, other: SessionModel) -> ModelCheck:
    """Compare a session's model with `other` and re-validate `plan` against `other`'s config."""
    known = session_model.fingerprint and other.fingerprint
    same = (session_model.fingerprint == other.fingerprint) if known else None
    check = ModelCheck(same, session_model.fingerprint, other.fingerprint)
    if other.config is not None:
        check.problems, check.warnings = validate_steps(plan, other.config)
    return check
