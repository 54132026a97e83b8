"""Size metrics from metadata alone: parameters (total, non-embedding), bytes on disk, FLOPs per token.

Parameters and FLOPs come from `surgery.inspect.inspect_model` (config.json + safetensors headers, no weights
read). Bytes on disk are the sizes of the files the user's source consists of: the .gguf file for a GGUF source
(not its dequantized conversion in the cache), else the weight files of the directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgery.fingerprint import weight_files
from surgery.inspect import inspect_model
from surgery.sources import ResolvedSource


@dataclass(frozen=True)
class SizeResult:
    """Size of one model.

    Attributes:
        params_total: every parameter, a tied embedding counted once.
        params_non_embedding: params_total minus the input embedding (and an untied lm_head).
        bytes_on_disk: bytes of the weight files (or the .gguf file).
        flops_per_token: forward FLOPs for one token at `context` tokens of context (see `inspect_model`).
        context: the context length of the FLOPs figure.
    """

    params_total: int
    params_non_embedding: int
    bytes_on_disk: int
    flops_per_token: int
    context: int


def bytes_on_disk(resolved: ResolvedSource) -> int:
    """Bytes of the weights as the user holds them: the .gguf file, or the directory's weight files."""
    if resolved.gguf_file is not None:
        return Path(resolved.gguf_file).stat().st_size
    return sum(f.stat().st_size for f in weight_files(Path(resolved.path)))


def model_size(resolved: ResolvedSource, *, context: int = 2048) -> SizeResult:
    """Parameters, bytes on disk and FLOPs/token of a resolved source, from its headers only.

    Args:
        resolved: The model (see `surgery.sources.resolve_source`).
        context: Tokens of context for the attention term of the FLOPs.

    Returns:
        A SizeResult.

    Raises:
        SourceError: Missing or corrupt config/headers.
    """
    report = inspect_model(resolved.path, context=context)
    return SizeResult(
        params_total=report.params_total,
        params_non_embedding=report.params_non_embedding,
        bytes_on_disk=bytes_on_disk(resolved),
        flops_per_token=report.flops_per_token,
        context=context,
    )
