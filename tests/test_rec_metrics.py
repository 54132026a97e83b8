"""surgery.rec.metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from surgery.errors import UserError
from surgery.rec.metrics import (
    metrics_from_ranks,
    parse_protocol,
    ranks_full,
    ranks_sampled,
    sample_negatives,
)


def test_metrics_from_ranks_by_hand():
    m = metrics_from_ranks(torch.tensor([0, 2, 7, 20]))
    assert m["hr@1"] == pytest.approx(0.25)
    assert m["hr@5"] == pytest.approx(0.5)
    assert m["hr@10"] == pytest.approx(0.75)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(9)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 8 + 1 / 21) / 4)


def test_full_ranking_excludes_history_and_padding_and_counts_ties_against():
    # items 1..5; column 0 is padding with a huge score that must be ignored
    scores = torch.tensor([[99.0, 0.5, 0.9, 0.7, 0.1, 0.7],
                           [99.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    histories = torch.tensor([[2, 0], [0, 0]])  # user 0 saw item 2 (the best-scored): not a competitor
    targets = torch.tensor([3, 1])
    ranks = ranks_full(scores, targets, histories)
    # user 0: candidates 1, 4, 5 (2 is in history); 5 ties with the target at 0.7 -> rank 1
    # user 1: all equal -> the 4 other items count as ahead
    assert ranks.tolist() == [1, 4]


def test_sampled_ranking_and_negatives_are_seeded_and_unseen():
    histories = torch.tensor([[1, 2, 0], [3, 0, 0]])
    targets = torch.tensor([3, 4])
    a = sample_negatives(histories, targets, num_items=20, n=10, seed=5)
    b = sample_negatives(histories, targets, num_items=20, n=10, seed=5)
    c = sample_negatives(histories, targets, num_items=20, n=10, seed=6)
    assert a.equal(b) and not a.equal(c)
    for u in range(2):
        row = set(a[u].tolist())
        assert len(row) == 10 and not row & (set(histories[u].tolist()) | {0, int(targets[u])})
    scores = torch.arange(21, dtype=torch.float).repeat(2, 1)  # item i scores i
    ranks = ranks_sampled(scores, targets, a)
    assert ranks.tolist() == [int((a[u] > targets[u]).sum()) for u in range(2)]
    with pytest.raises(UserError, match="unseen"):
        sample_negatives(histories, targets, num_items=5, n=10)


def test_protocol_names():
    assert parse_protocol("full") is None and parse_protocol("sampled-999") == 999
    with pytest.raises(UserError, match="protocol"):
        parse_protocol("sampled-x")
