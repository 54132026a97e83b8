"""Top-k recommendation metrics: HR@k, NDCG@k and MRR of one held-out item per user.

Two protocols:
- "full" (default): the target is ranked against every item.
- "sampled-999": the target is ranked against 999 sampled negatives (the SLMRec paper's protocol). Negatives are
  drawn uniformly without replacement from the items the user has not interacted with, with a seeded generator,
  user by user in user order, so one seed gives the same candidates to every model.

In both protocols items in the user's history are never candidates (a user rates a movie once; recommending a
watched movie is not a hit or a miss), and padding (item 0) is never a candidate.

Ranks are 0-based and pessimistic: rank = the number of other candidates scoring >= the target. Ties count against
the target, so a model that gives every item the same score gets the worst rank, not the best.

HR@k = mean(rank < k); NDCG@k = mean(1 / log2(rank + 2) when rank < k, else 0) (one relevant item, so the ideal
DCG is 1); MRR = mean(1 / (rank + 1)) over the whole list (no cut-off).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from surgery.errors import UserError

HR_KS = (1, 5, 10)
NDCG_KS = (5, 10)
PROTOCOLS = ("full", "sampled-999")


def metrics_from_ranks(ranks: torch.Tensor, hr_ks=HR_KS, ndcg_ks=NDCG_KS) -> dict[str, float]:
    """HR@k, NDCG@k and MRR from 0-based ranks.

    Args:
        ranks: (U,) int64, 0 = the target came first.

    Returns:
        {"hr@1": ..., "hr@5": ..., "hr@10": ..., "ndcg@5": ..., "ndcg@10": ..., "mrr": ..., "users": U}.
    """
    if ranks.numel() == 0:
        raise UserError("no users to evaluate")
    r = ranks.double()
    out: dict[str, float] = {f"hr@{k}": float((r < k).double().mean()) for k in hr_ks}
    gain = 1.0 / torch.log2(r + 2.0)  # (U,)
    for k in ndcg_ks:
        out[f"ndcg@{k}"] = float(torch.where(r < k, gain, torch.zeros_like(gain)).mean())
    out["mrr"] = float((1.0 / (r + 1.0)).mean())
    out["users"] = int(ranks.numel())
    return out


def _seen_mask(histories: torch.Tensor, num_items: int) -> torch.Tensor:
    """(U, L) histories (0 = padding) -> (U, N + 1) bool, True for padding and every item in the history."""
    seen = torch.zeros(histories.shape[0], num_items + 1, dtype=torch.bool)
    seen.scatter_(1, histories.cpu(), True)  # padding 0 marks column 0, which is never a candidate anyway
    seen[:, 0] = True
    return seen


def ranks_full(scores: torch.Tensor, targets: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
    """Rank of each target among all items it was not seen with.

    Args:
        scores: (U, N + 1) float, column i scores item i (column 0 is padding and ignored).
        targets: (U,) int64 in 1..N.
        histories: (U, L) int64, 0-padded: these items are not candidates.

    Returns:
        (U,) int64 ranks.
    """
    scores = scores.detach().float().cpu()
    excluded = _seen_mask(histories, scores.shape[1] - 1)  # (U, N + 1)
    excluded[torch.arange(len(targets)), targets.cpu()] = True  # the target is not its own competitor
    target_scores = scores.gather(1, targets.cpu().view(-1, 1))  # (U, 1)
    ahead = (scores >= target_scores) & ~excluded  # (U, N + 1)
    return ahead.sum(1)


def sample_negatives(histories: torch.Tensor, targets: torch.Tensor, num_items: int, n: int = 999,
                     seed: int = 0) -> torch.Tensor:
    """n distinct negatives per user from the items outside its history and target, seeded.

    Args:
        histories: (U, L) int64, 0-padded.
        targets: (U,) int64.
        num_items: Items are 1..num_items.
        n: Negatives per user.
        seed: The same seed gives the same negatives.

    Returns:
        (U, n) int64 item ids.

    Raises:
        UserError: A user has fewer than n unseen items.
    """
    seen = _seen_mask(histories, num_items)
    seen[torch.arange(len(targets)), targets.cpu()] = True
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(len(targets), n, dtype=torch.long)
    for u in range(len(targets)):
        perm = torch.randperm(num_items, generator=g) + 1  # (N,) a random order of items 1..N
        free = perm[~seen[u, perm]]
        if free.numel() < n:
            raise UserError(f"only {free.numel()} unseen items for a user but {n} negatives were asked for: "
                            "use the full protocol or fewer negatives")
        out[u] = free[:n]
    return out


def ranks_sampled(scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Rank of each target among its own negatives.

    Args:
        scores: (U, N + 1) float.
        targets: (U,) int64.
        negatives: (U, n) int64.

    Returns:
        (U,) int64 ranks in 0..n.
    """
    scores = scores.detach().float().cpu()
    t = scores.gather(1, targets.cpu().view(-1, 1))  # (U, 1)
    neg = scores.gather(1, negatives.cpu())  # (U, n)
    return (neg >= t).sum(1)


def _check_scores(scores: torch.Tensor, first_user: int) -> None:
    """Refuse NaN scores: every comparison with NaN is false, so a diverged model would rank each target first
    (HR@10 1.0) instead of last."""
    bad = torch.isnan(scores[:, 1:]).any(1)  # column 0 is padding
    if bool(bad.any()):
        raise UserError(f"the model scores items as NaN (first for user {first_user + int(bad.nonzero()[0])}): its "
                        "weights are not finite (a diverged training run?); nothing to rank")


def parse_protocol(protocol: str) -> int | None:
    """"full" -> None; "sampled-N" -> N negatives.

    Raises:
        UserError: Anything else.
    """
    if protocol == "full":
        return None
    if protocol.startswith("sampled-") and protocol[8:].isdigit() and int(protocol[8:]) > 0:
        return int(protocol[8:])
    raise UserError(f"unknown protocol {protocol!r}: use 'full' or 'sampled-999' (any 'sampled-N' works)")


Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def evaluate(scorer: Scorer, data, *, split: str = "test", protocols: tuple[str, ...] = ("full",), seed: int = 0,
             batch_size: int = 128, users: list[int] | None = None,
             progress: Callable[..., None] | None = None, cancel: threading.Event | None = None) -> dict:
    """Rank every user's held-out item under each protocol (the model scores each user once).

    Args:
        scorer: (histories (B, L), lengths (B,)) -> (B, N + 1) scores for the next item.
        data: A `surgery.rec.data.RecData`.
        split: "test" or "valid".
        protocols: Any of "full", "sampled-N".
        seed: Negative-sampling seed (sampled protocols).
        batch_size: Users per scorer call.
        users: Evaluate these users only (default: all).
        progress: Called with (done, total) user counts.
        cancel: Set to stop early (raises UserError).

    Returns:
        {protocol: metrics_from_ranks(...) + "protocol", "split", "data_fingerprint" (and "seed" when sampled)}.
    """
    n_negs = {p: parse_protocol(p) for p in protocols}
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    if users is not None and not users:  # --max-users 0
        raise UserError("no users to evaluate: --max-users must be at least 1")
    histories, lengths, targets = data.eval_examples(split, users)
    negatives = {p: sample_negatives(histories, targets, data.num_items, n, seed)
                 for p, n in n_negs.items() if n is not None}
    ranks: dict[str, list[torch.Tensor]] = {p: [] for p in protocols}
    with torch.no_grad():
        for start in range(0, len(targets), batch_size):
            if cancel is not None and cancel.is_set():
                raise UserError("evaluation cancelled")
            sl = slice(start, start + batch_size)
            width = max(1, int(lengths[sl].max()))  # no column beyond the longest history in the batch
            scores = scorer(histories[sl, :width], lengths[sl])  # (B, N + 1)
            _check_scores(scores, start)
            for p in protocols:
                if n_negs[p] is None:
                    ranks[p].append(ranks_full(scores, targets[sl], histories[sl]))
                else:
                    ranks[p].append(ranks_sampled(scores, targets[sl], negatives[p][sl]))
            if progress is not None:
                progress(min(start + batch_size, len(targets)), len(targets))
    out = {}
    for p in protocols:
        out[p] = {**metrics_from_ranks(torch.cat(ranks[p])), "protocol": p, "split": split,
                  "data_fingerprint": data.fingerprint}
        if n_negs[p] is not None:
            out[p]["seed"] = seed
    return out
