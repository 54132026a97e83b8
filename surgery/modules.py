"""Small nn.Modules that stand in for removed or factorised parts of a decoder layer.

Each one keeps a zero-length *placeholder* tensor under the name of the weight it replaced. Why: plain
`from_pretrained` silently re-initialises weights that are missing from a checkpoint (a warning, no error), but it
refuses a tensor whose shape does not match. The placeholder turns "surgery-only checkpoint loaded by plain
transformers" from silent garbage into a loud error, and costs 0 bytes.
"""

from __future__ import annotations

import torch
from torch import nn


class Placeholder(nn.Module):
    """Holds an empty `weight` buffer under the name of a removed Linear (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(0), persistent=True)


class SkippedAttention(nn.Module):
    """A removed attention sub-block: contributes nothing to the residual stream.

    It still records a key/value entry in the KV cache, so that `cache.get_seq_length()` and the causal-mask sizes
    (both read from layer 0 by default) stay right when the first layer's attention is the one removed. The entry
    is one head of width 1 per token, not zero heads: `DynamicLayer.get_seq_length()` returns 0 for an entry with no
    elements, and every later layer's mask and positions would then be built as if nothing were cached.
    """

    def __init__(self, layer_idx: int, head_dim: int, placeholder: str) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.add_module(placeholder, Placeholder())

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and hasattr(cache, "update"):
            b, t = hidden_states.shape[:2]
            marker = hidden_states.new_zeros(b, 1, t, 1)  # (B, 1 head, T, width 1): B*T elements, never read
            cache.update(marker, marker, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """A removed MLP sub-block: contributes nothing to the residual stream."""

    def __init__(self, placeholder: str) -> None:
        super().__init__()
        self.add_module(placeholder, Placeholder())

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class LowRankLinear(nn.Module):
    """y = b(a(x)): a Linear W (out x in) replaced by B (out x r) @ A (r x in), bias kept on `b`.

    `weight` is a zero-length placeholder (see the module docstring), not the product B @ A.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.a = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.b = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) of a Linear, or of a LowRankLinear multiplied back (B @ A): what exporters to
    runtimes without a factored Linear write."""
    if isinstance(module, LowRankLinear):
        return module.b.weight @ module.a.weight, module.b.bias
    return module.weight, getattr(module, "bias", None)
