"""Registry of supported model families, looked up by `config.model_type`."""

from __future__ import annotations

from surgery.arch import gemma3, gpt2, llama, moe, phi3, qwen2, qwen3
from surgery.arch.base import ArchSpec
from surgery.errors import UnsupportedModelError

FAMILIES: tuple[ArchSpec, ...] = (llama.SPEC, qwen2.SPEC, qwen3.SPEC, gemma3.SPEC, phi3.SPEC, gpt2.SPEC, moe.QWEN3_MOE,
                                  moe.MIXTRAL)
_BY_MODEL_TYPE: dict[str, ArchSpec] = {t: spec for spec in FAMILIES for t in spec.model_types}


def supported_model_types() -> list[str]:
    """Every `model_type` some family handles, sorted."""
    return sorted(_BY_MODEL_TYPE)


def spec_for_model_type(model_type: str | None) -> ArchSpec:
    """The family spec for a config's `model_type`, or a clear error listing what is supported."""
    spec = _BY_MODEL_TYPE.get(model_type or "")
    if spec is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return spec


def spec_for_config(config) -> ArchSpec:
    """The family spec for a transformers config object (or a config.json dict)."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return spec_for_model_type(model_type)


__all__ = ["ArchSpec", "FAMILIES", "spec_for_config", "spec_for_model_type", "supported_model_types"]
