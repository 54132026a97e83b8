"""Perplexity on the calibration contract's token blocks (surgery.data.load_blocks).

Two modes, both over the same kept tokens (the blocks flattened back into one stream of N tokens):

- non-overlapping (default, `stride=None`): each block of seq_len tokens is one window and predicts its own
  seq_len - 1 next tokens (`TokenBlocks.num_targets` targets in all);
- sliding (`stride=S`, 1 <= S <= seq_len): Hugging Face's sliding-window recipe. Windows of seq_len tokens start
  at 0, S, 2S, ... (the last one may be shorter); each window scores only the tokens the previous window did not
  reach, so every token 1..N-1 is scored exactly once, with at least seq_len - S tokens of context after the first
  window. With S == seq_len this gives exactly the non-overlapping number.

perplexity = exp(sum of -log p(target) / number of targets), log-probabilities computed in float32 whatever the
model's dtype.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from surgery.data import TokenBlocks
from surgery.errors import UserError
from surgery.metrics.common import ProgressFn, check_cancel, emit

# log_softmax over the vocabulary is done this many positions at a time, so the float32 copy of the logits that
# it needs stays small (a full (1, 2048, 49152) float32 copy is 400 MB).
_CHUNK = 256


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity and what it was computed from.

    Attributes:
        perplexity: exp(nll_sum / targets).
        nll_sum: summed negative log-likelihood (nats).
        targets: tokens scored.
        windows: forward passes (windows) run.
        seq_len: window length.
        stride: window stride, None for non-overlapping blocks.
    """

    perplexity: float
    nll_sum: float
    targets: int
    windows: int
    seq_len: int
    stride: int | None

    @property
    def nll_per_token(self) -> float:
        """Mean negative log-likelihood per scored token (nats)."""
        return self.nll_sum / self.targets


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens [begin, end) of the stream, scoring targets at positions >= first_target."""

    begin: int
    end: int
    first_target: int


def plan_windows(num_tokens: int, seq_len: int, stride: int | None) -> list[Window]:
    """The windows that score every token 1..num_tokens-1 once (see the module docstring).

    Args:
        num_tokens: Length of the token stream.
        seq_len: Window length.
        stride: Distance between window starts; None means seq_len with each window scoring only itself.

    Raises:
        UserError: stride out of range.
    """
    if stride is not None and not 1 <= stride <= seq_len:
        raise UserError(f"--stride must be between 1 and --seq-len ({seq_len}), got {stride}")
    step = stride or seq_len
    windows, prev_end, begin = [], 0, 0
    while prev_end < num_tokens:
        end = min(begin + seq_len, num_tokens)
        # a target needs at least one token of context inside its own window
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        begin += step
    return [w for w in windows if w.first_target < w.end]


def _window_nll(logits: torch.Tensor, ids: torch.Tensor, first_local: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of the targets of a batch of equal-length windows.

    Args:
        logits: (B, T, V) logits of the model on `ids`.
        ids: (B, T) the windows' tokens.
        first_local: (B,) index (within the window) of each window's first target, >= 1.

    Returns:
        (sum of -log p(target), number of targets).
    """
    b, t, _ = logits.shape
    # target j (1 <= j < T) is predicted by logits at position j - 1
    positions = torch.arange(1, t, device=ids.device)  # (T-1,)
    mask = positions.unsqueeze(0) >= first_local.unsqueeze(1)  # (B, T-1)
    total = 0.0  # a Python float (double): MPS has no float64 tensors
    for c0 in range(0, t - 1, _CHUNK):
        c1 = min(c0 + _CHUNK, t - 1)
        logp = torch.log_softmax(logits[:, c0:c1].float(), dim=-1)  # (B, c, V)
        target = ids[:, c0 + 1 : c1 + 1].unsqueeze(-1)  # (B, c, 1)
        nll = -logp.gather(-1, target).squeeze(-1)  # (B, c)
        total += float((nll * mask[:, c0:c1]).sum())
    return total, int(mask.sum())


@torch.inference_mode()
def perplexity(
    model,
    blocks: TokenBlocks,
    *,
    stride: int | None = None,
    batch_size: int = 1,
    progress: ProgressFn = None,
    cancel: threading.Event | None = None,
    label: str = "",
) -> PerplexityResult:
    """Perplexity of `model` on `blocks` (see the module docstring for the windows).

    Args:
        model: A causal LM (returns `.logits`), in eval mode.
        blocks: Token blocks from `surgery.data.load_blocks`; their seq_len is the window length.
        stride: None for non-overlapping blocks, else the sliding-window stride.
        batch_size: Windows per forward pass.
        progress: Called with a ProgressEvent("perplexity", done, total) after each batch.
        cancel: Stop at the next batch and raise Cancelled when set.
        label: The model's name for progress events.

    Returns:
        A PerplexityResult.

    Raises:
        UserError: Bad stride or batch size.
        Cancelled: `cancel` was set.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    stream = blocks.ids.reshape(-1)  # (N,) the kept tokens, in file order
    seq_len = blocks.seq_len
    windows = plan_windows(stream.numel(), seq_len, stride)
    # batch windows of equal length together (all but possibly the last are full-length)
    groups: list[list[Window]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and groups[-1][0].end - groups[-1][0].begin == w.end - w.begin:
            groups[-1].append(w)
        else:
            groups.append([w])
    nll_sum, targets, done = 0.0, 0, 0
    emit(progress, "perplexity", 0, len(windows), model=label)
    for group in groups:
        check_cancel(cancel)
        ids = torch.stack([stream[w.begin : w.end] for w in group]).to(device)  # (B, T)
        first = torch.tensor([w.first_target - w.begin for w in group], device=device)  # (B,)
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        s, n = _window_nll(logits, ids, first)
        nll_sum, targets, done = nll_sum + s, targets + n, done + len(group)
        emit(progress, "perplexity", done, len(windows), model=label)
    return PerplexityResult(math.exp(nll_sum / targets), nll_sum, targets, len(windows), seq_len, stride)
