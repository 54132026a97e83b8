"""Classical sequential recommenders: SASRec (self-attention) and GRU4Rec (recurrent), small and CPU-friendly.

Both share the `RecModel` interface that the training loop, the evaluator and the LLM recommender use:

    hidden(inputs)            (B, L) item ids, right-padded with 0 -> (B, L, D) sequence states
    item_embeddings()         (N + 1, D) the vectors items are scored against (row 0 = padding)
    logits(inputs)            (B, L, N + 1) next-item scores at every position
    score(histories, lengths) (B, N + 1) next-item scores after each history (its last real position)
    train_loss(inputs, targets) -> (loss, {term: value}) cross-entropy over all items at every position
    spec()                    JSON-able constructor arguments (what `surgery.rec.store` saves)

Right padding (real items first) means a causal model never attends to padding and needs no attention mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def next_item_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over all items at every position with a target.

    Args:
        logits: (B, L, N + 1).
        targets: (B, L) int64, 0 = no target (ignored).

    Returns:
        Scalar mean over the positions with a target.
    """
    # padding (column 0) is never a right answer: push it out of the softmax
    logits = logits.float() + _pad_bias(logits)  # (B, L, N + 1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=0)


def _pad_bias(logits: torch.Tensor) -> torch.Tensor:
    """(N + 1,) 0 everywhere but -inf-like on the padding column, so padding is never predicted."""
    bias = torch.zeros(logits.shape[-1], device=logits.device)
    bias[0] = -1e9
    return bias


def last_position(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L, D) states, (B,) lengths -> (B, D) the state at each row's last real position."""
    idx = (lengths.to(states.device) - 1).clamp_min(0).view(-1, 1, 1).expand(-1, 1, states.shape[-1])
    return states.gather(1, idx).squeeze(1)


class RecModel(nn.Module):
    """Shared scoring and loss on top of `hidden` and `item_embeddings` (see the module docstring)."""

    kind = "base"

    def hidden(self, inputs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def item_embeddings(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, N + 1)."""
        return self.hidden(inputs) @ self.item_embeddings().t()

    def score(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L), (B,) -> (B, N + 1) next-item scores after each history."""
        last = last_position(self.hidden(histories), lengths)  # (B, D)
        return last @ self.item_embeddings().t()

    def train_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Next-item cross-entropy at every position: (loss, {"ce": value})."""
        loss = next_item_ce(self.logits(inputs), targets)
        return loss, {"ce": float(loss.detach())}


class SASRec(RecModel):
    """Self-attentive sequential recommendation (Kang & McAuley 2018): causal pre-LN transformer over item ids.

    Args:
        num_items: Items are 1..num_items (0 = padding).
        max_len: Longest history (learned positions).
        dim: Embedding width D.
        layers: Transformer blocks.
        heads: Attention heads.
        dropout: Dropout on embeddings and inside blocks.
    """

    kind = "sasrec"

    def __init__(self, num_items: int, max_len: int = 50, dim: int = 64, layers: int = 2, heads: int = 2,
                 dropout: float = 0.2):
        super().__init__()
        self.args = dict(num_items=num_items, max_len=max_len, dim=dim, layers=layers, heads=heads, dropout=dropout)
        self.items = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.positions = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim * 2, dropout=dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.items.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        b, length = inputs.shape
        pos = torch.arange(length, device=inputs.device)
        x = self.items(inputs) * self.items.embedding_dim**0.5 + self.positions(pos)  # (B, L, D)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=inputs.device)  # (L, L)
        x = self.blocks(self.drop(x), mask=causal, is_causal=True)
        return self.norm(x)  # (B, L, D)

    def item_embeddings(self) -> torch.Tensor:
        return self.items.weight

    def spec(self) -> dict:
        return {"kind": self.kind, **self.args}


class GRU4Rec(RecModel):
    """Session-based recommendation with a GRU (Hidasi et al. 2016), trained on every position.

    Args:
        num_items: Items are 1..num_items (0 = padding).
        dim: Embedding width D (scores are dot products with the item embeddings).
        hidden_size: GRU width.
        layers: GRU layers.
        dropout: Dropout on the embeddings.
    """

    kind = "gru4rec"

    def __init__(self, num_items: int, dim: int = 64, hidden_size: int = 128, layers: int = 1, dropout: float = 0.2):
        super().__init__()
        self.args = dict(num_items=num_items, dim=dim, hidden_size=hidden_size, layers=layers, dropout=dropout)
        self.items = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, hidden_size, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden_size, dim)
        nn.init.normal_(self.items.weight, std=0.02)

    def hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.drop(self.items(inputs)))  # (B, L, H)
        return self.out(states)  # (B, L, D)

    def item_embeddings(self) -> torch.Tensor:
        return self.items.weight

    def spec(self) -> dict:
        return {"kind": self.kind, **self.args}


BASELINES = {"sasrec": SASRec, "gru4rec": GRU4Rec}


def build_baseline(spec: dict) -> RecModel:
    """A baseline from its `spec()` (kind + constructor arguments)."""
    args = dict(spec)
    return BASELINES[args.pop("kind")](**args)
