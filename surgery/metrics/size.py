"""Size metrics from metadata alone: parameters (total, non-embedding), bytes on disk, FLOPs per token.

Parameters and FLOPs come from `surgery.inspect.inspect_model` (config.json + safetensors headers, no weights
read). Bytes on disk are the sizes of the files the user's source consists of: the .gguf file for a GGUF source
(not its dequantized conversion in the cache), else the weight files of the directory. Because a 4-bit GGUF and a
float32 output are not like with like, every size also says what it is (`format`: "gguf Q4_1", "safetensors F32")
and `bytes_checkpoint` is the size of the HF checkpoint the model runs from (for a GGUF source: its dequantized
conversion), the figure a pruned output is compared with.
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
    format: str = ""  # what bytes_on_disk measures, e.g. "gguf Q4_1" or "safetensors F32"
    bytes_checkpoint: int = 0  # the HF checkpoint's weight files (a GGUF source's dequantized conversion)
    checkpoint_format: str = ""


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
    checkpoint = describe_format(report)
    as_given = describe_format(inspect_model(resolved.gguf_file)) if resolved.gguf_file is not None else checkpoint
    return SizeResult(
        params_total=report.params_total,
        params_non_embedding=report.params_non_embedding,
        bytes_on_disk=bytes_on_disk(resolved),
        flops_per_token=report.flops_per_token,
        context=context,
        format=as_given,
        bytes_checkpoint=sum(f.stat().st_size for f in weight_files(Path(resolved.path))),
        checkpoint_format=checkpoint,
    )


def describe_format(report) -> str:
    """"safetensors F32", "gguf Q4_1+F32": the file format and the dtypes holding most of the bytes (>= 5%)."""
    total = sum(report.dtypes.values()) or 1
    big = [d for d, n in sorted(report.dtypes.items(), key=lambda kv: -kv[1]) if n / total >= 0.05] or ["?"]
    return f"{report.format} {'+'.join(big)}"
