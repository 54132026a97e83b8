"""Speed on the current device: prefill latency, decode throughput at batch 1 and batch B, peak memory.

- prefill: one forward pass over a prompt of N tokens with a fresh KV cache, keeping only the last position's
  logits (what a server does before its first new token); milliseconds.
- decode: after an untimed prefill of a short prompt, `new_tokens` greedy steps of one token each through the KV
  cache, timed alone (so prefill does not leak into it); tokens/s = batch * new_tokens / seconds.
- warm-up runs come first and are excluded; each figure is the median of `repeats` runs, reported with the spread
  ((max - min) / 2) and every sample.
- peak memory: on CUDA, `torch.cuda.max_memory_allocated` after resetting the peak counter (tensors only, no
  allocator cache). On CPU (Linux), the process's resident-set high-water mark (VmHWM) after resetting it through
  /proc/self/clear_refs: the peak while the speed runs were going, weights included. Where the reset is not
  possible the process's lifetime peak (ru_maxrss) is reported and the record says so.
"""

from __future__ import annotations

import inspect
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery.errors import UserError
from surgery.metrics.common import ProgressFn, check_cancel, emit, median_spread, sync


@dataclass(frozen=True)
class Timing:
    """Median of repeated measurements, the spread ((max - min) / 2) and the samples themselves."""

    median: float
    spread: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        m, s = median_spread(samples)
        return cls(m, s, list(samples))


@dataclass(frozen=True)
class SpeedResult:
    """Speed of one model on one device.

    Attributes:
        prefill_ms: latency of a prompt of `prompt_len` tokens (batch 1).
        decode_tps_1: decode tokens/s at batch 1.
        decode_tps_b: decode tokens/s at batch `batch` (total over the batch).
        peak_memory_mib: peak memory in MiB (see `memory_method`).
        memory_method: "cuda_max_allocated", "rss_high_water" or "process_peak_rss".
    """

    prefill_ms: Timing
    decode_tps_1: Timing
    decode_tps_b: Timing
    peak_memory_mib: float
    memory_method: str
    prompt_len: int
    new_tokens: int
    batch: int
    repeats: int
    warmup: int


class _PeakMemory:
    """Peak memory over a stretch of code (see the module docstring for the methods)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "process_peak_rss"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.method = "cuda_max_allocated"
        elif _reset_rss_high_water():
            self.method = "rss_high_water"

    def read_mib(self) -> float:
        if self.method == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.method == "rss_high_water":
            hwm = _vm_hwm_kib()
            if hwm is not None:
                return hwm / 1024
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is KiB on Linux, bytes on macOS
        return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def _vm_hwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_rss_high_water() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    if _vm_hwm_kib() is None:
        return False
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1:].argmax(-1)  # (B, 1)


def _prefill(model, ids: torch.Tensor):
    return model(input_ids=ids, use_cache=True, logits_to_keep=1)


def _cache_arg(model) -> str:
    """The forward's KV-cache keyword: `cache` (transformers >= 5.24), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def timed_greedy_decode(model, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[float, torch.Tensor]:
    """Greedy decoding through the KV cache, timing only the decode steps.

    Args:
        model: A causal LM in eval mode.
        prompt: (B, P) token ids; its prefill is not timed.
        new_tokens: Cached one-token steps to time (the prefill already yields the first new token).
        device: The model's device (for synchronisation).

    Returns:
        (seconds for the `new_tokens` steps, (B, new_tokens + 1) greedy tokens: the prefill's and each step's).
    """
    arg = _cache_arg(model)
    out = _prefill(model, prompt)
    cache, nxt = _cache_of(out), _greedy(out.logits)
    produced = [nxt]
    sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{arg: cache})
        cache, nxt = _cache_of(out), _greedy(out.logits)  # (B, 1)
        produced.append(nxt)
    sync(device)
    return time.perf_counter() - t0, torch.cat(produced, dim=1)


@torch.inference_mode()
def measure_speed(
    model,
    prompts: torch.Tensor,
    *,
    new_tokens: int = 16,
    batch: int = 4,
    repeats: int = 3,
    warmup: int = 1,
    decode_prompt_len: int = 16,
    progress: ProgressFn = None,
    cancel: threading.Event | None = None,
    label: str = "",
) -> SpeedResult:
    """Measure prefill latency, decode throughput and peak memory.

    Args:
        model: A causal LM in eval mode; it runs on its own device.
        prompts: (R, N) token ids, R >= max(1, batch): row 0 is the prefill prompt (N tokens), the first
            `decode_prompt_len` tokens of the first `batch` rows start the decode runs.
        new_tokens: Decode steps per run.
        batch: B for the batched decode figure.
        repeats: Timed runs per figure (median and spread reported).
        warmup: Untimed runs before each figure.
        decode_prompt_len: Prompt length for the decode runs.
        progress: Called with ProgressEvent("speed", done, total) after every run.
        cancel: Stop at the next run and raise Cancelled when set.
        label: The model's name for progress events.

    Raises:
        UserError: Bad settings (non-positive counts, too few prompt rows).
        Cancelled: `cancel` was set.
    """
    for name, value, low in (("--new-tokens", new_tokens, 1), ("--speed-batch", batch, 1),
                             ("--repeats", repeats, 1), ("--warmup", warmup, 0)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if prompts.dim() != 2 or prompts.shape[0] < batch:
        raise UserError(f"speed needs {batch} prompt rows, got {tuple(prompts.shape)}")
    param = next(model.parameters())
    device = str(param.device)
    prompts = prompts.to(param.device)
    prompt = prompts[:1]  # (1, N)
    short = prompts[:, : min(decode_prompt_len, prompts.shape[1])]  # (R, P)
    total, done = 3 * (warmup + repeats), 0
    emit(progress, "speed", 0, total, model=label)

    def runs(fn) -> list[float]:
        nonlocal done
        samples = []
        for i in range(warmup + repeats):
            check_cancel(cancel)
            value = fn()
            if i >= warmup:
                samples.append(value)
            done += 1
            emit(progress, "speed", done, total, model=label)
        return samples

    peak = _PeakMemory(param.device)

    def prefill_ms() -> float:
        sync(device)
        t0 = time.perf_counter()
        _prefill(model, prompt)
        sync(device)
        return (time.perf_counter() - t0) * 1e3

    pre = runs(prefill_ms)
    d1 = runs(lambda: new_tokens / timed_greedy_decode(model, short[:1], new_tokens, device)[0])
    db = runs(lambda: batch * new_tokens / timed_greedy_decode(model, short[:batch], new_tokens, device)[0])
    return SpeedResult(
        prefill_ms=Timing.of(pre),
        decode_tps_1=Timing.of(d1),
        decode_tps_b=Timing.of(db),
        peak_memory_mib=peak.read_mib(),
        memory_method=peak.method,
        prompt_len=int(prompt.shape[1]),
        new_tokens=new_tokens,
        batch=batch,
        repeats=repeats,
        warmup=warmup,
    )
