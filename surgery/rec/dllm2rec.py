"""DLLM2Rec (Cui et al., RecSys 2024, arXiv 2405.00338): distill an LLM recommender into SASRec or GRU4Rec.

The teacher's knowledge reaches the student in two ways:

1. Importance-aware ranking distillation. For every training prefix s (every position of every training
   sequence) the teacher's top-K items O_s (cached once, `surgery.rec.teacher_cache`) are positives of a BCE term
   that ranks each one above a sampled negative j:

       bce_sk      = -log sigmoid(y_sk) - log(1 - sigmoid(y_sj))         `ranking_bce`
       w^pos_sk    = softmax_k(-r_k / beta_pos),  r_k = 1..K (teacher rank)   `position_weights`
       w^conf_sk   = softmax_k(-d_sk / beta_conf)                          `confidence_weights`
                     d_sk = ||h^T_s - e^T_k||: the distance between the teacher's generated representation of
                     the prefix and candidate k's item embedding (the paper's distance between the LLM's generated
                     description and the grounded item)
       w^cons_sk   = [k in the student's current top-K for s]              `consistency_indicator`
                     (recomputed at every step from the student's detached scores)
       w_sk        = (g_pos w^pos + g_conf w^conf + g_cons w^cons) / sum_k (...)   `importance_weights`
       L_rank      = mean_s sum_k w_sk bce_sk                               `ranking_distillation_loss`

   History items of the prefix are excluded from the teacher's candidates, the student's top-K and the negatives
   (evaluation never ranks them either). The student's loss is CE + lambda * L_rank.

2. Collaborative embedding distillation. The student's item table becomes e_i + w * P(e^T_i), P a learned
   Linear from the teacher's item width to the student's and e^T the teacher's (frozen) item embeddings
   (`CollaborativeEmbedding`, a `torch.nn.utils.parametrize` parametrization of `items.weight`, so the sum is used
   everywhere the student reads its table: inputs and scoring). `DLLM2RecDistiller.fold` writes the sum into the
   plain table before saving: the saved student is an ordinary SASRec/GRU4Rec with the same inference cost.

Defaults follow the authors' code: K = 10, lambda = 0.8, w = 0.2, (g_pos, g_conf, g_cons) = (0.3, 0.5, 0.1),
beta_pos = beta_conf = 1. Their code writes the negative's term as log sigmoid(1 - y); this uses the paper's
log(1 - sigmoid(y)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from surgery.rec.models import RecModel, next_item_ce

WEIGHT_TERMS = ("position", "confidence", "consistency")
DEFAULT_WEIGHTS = {"position": 0.3, "confidence": 0.5, "consistency": 0.1}


def parse_rank_weights(text: str) -> dict[str, float]:
    """"position:1,confidence:1,consistency:1" -> {term: gamma}; terms not named weigh 0.

    Raises:
        UserError: An unknown term, a bad number, or every gamma 0 (use --lambda 0 to turn ranking distillation off).
    """
    from surgery.rec.distill import parse_weights

    given = parse_weights(text, WEIGHT_TERMS, "--weights", "term", "position:1,confidence:1,consistency:1",
                          "--weights gives every term weight 0: use --lambda 0 to train without ranking distillation")
    return {name: given.get(name, 0.0) for name in WEIGHT_TERMS}


def position_weights(k: int, beta: float = 1.0) -> torch.Tensor:
    """w^pos: (K,) softmax over -rank / beta for ranks 1..K (the teacher's first candidate weighs most)."""
    ranks = torch.arange(1, k + 1, dtype=torch.float32)
    return torch.softmax(-ranks / beta, dim=0)


def confidence_weights(distances: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """w^conf: (..., K) distances -> (..., K) softmax over -distance / beta (closer = more confident)."""
    return torch.softmax(-distances.float() / beta, dim=-1)


def consistency_indicator(candidates: torch.Tensor, student_top: torch.Tensor) -> torch.Tensor:
    """w^cons: (..., K) teacher candidates, (..., K') student top items -> (..., K) 1.0 where the candidate is in
    the student's top list, else 0.0."""
    return (candidates.unsqueeze(-1) == student_top.unsqueeze(-2)).any(-1).float()


def importance_weights(w_pos: torch.Tensor, w_conf: torch.Tensor, w_cons: torch.Tensor,
                       gammas: dict[str, float]) -> torch.Tensor:
    """w = (g_pos w^pos + g_conf w^conf + g_cons w^cons), normalised to sum 1 over each prefix's K candidates.

    Args:
        w_pos: (K,) or broadcastable to the others.
        w_conf, w_cons: (..., K).
        gammas: {"position": g_pos, "confidence": g_conf, "consistency": g_cons} (missing names count 0).

    Returns:
        (..., K); a prefix whose weights are all 0 (only consistency weighted and no overlap) keeps 0 weights, so
        it adds nothing rather than a uniform guess.
    """
    w = (gammas.get("position", 0.0) * w_pos + gammas.get("confidence", 0.0) * w_conf
         + gammas.get("consistency", 0.0) * w_cons)  # (..., K)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-12)


def ranking_bce(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(pos) - log(1 - sigmoid(neg)), elementwise (softplus form: stable for any score)."""
    return F.softplus(-pos) + F.softplus(neg)


def prefix_seen(inputs: torch.Tensor, num_items: int) -> torch.Tensor:
    """(B, L) right-padded item ids -> (B, L, N + 1) bool: item i is in inputs[b, :t + 1] (and padding 0 always)."""
    b, length = inputs.shape
    at = torch.zeros(b, length, num_items + 1, device=inputs.device)
    at.scatter_(2, inputs.unsqueeze(-1), 1.0)  # (B, L, N + 1): the item at each position
    # carried to every later position: a lower-triangular matmul (several times faster than cummax on CPU)
    seen = (torch.ones(length, length, device=inputs.device).tril() @ at) > 0  # (B, L, N + 1)
    seen[..., 0] = True
    return seen


def top_unseen(scores: torch.Tensor, seen: torch.Tensor, k: int) -> torch.Tensor:
    """(..., N + 1) scores, (..., N + 1) bool -> (..., K) ids of the k best items that are not `seen`."""
    return scores.masked_fill(seen, float("-inf")).topk(k, dim=-1).indices


def sample_prefix_negatives(seen: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None
                            ) -> torch.Tensor:
    """(B, L, N + 1) seen, (B, L) targets -> (B, L) one uniform negative per prefix: never seen, never the target.

    Rejection sampling (draw from 1..N, redraw the ones that hit a seen item or the target) is uniform over the
    allowed items and far cheaper than a multinomial over (B * L, N + 1) when, as here, most items are allowed.
    """
    n = seen.shape[-1] - 1
    neg = torch.randint(1, n + 1, targets.shape, generator=generator, device=targets.device)  # (B, L)
    for _ in range(1000):  # the expected number of rounds is small unless almost every item is seen
        bad = seen.gather(-1, neg.unsqueeze(-1)).squeeze(-1) | (neg == targets)
        if not bad.any():
            break
        neg[bad] = torch.randint(1, n + 1, (int(bad.sum()),), generator=generator, device=targets.device)
    return neg


def ranking_distillation_loss(scores: torch.Tensor, candidates: torch.Tensor, weights: torch.Tensor,
                              negatives: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_rank = mean over prefixes with a target of sum_k w_sk * ranking_bce(y_s[cand_k], y_s[neg]).

    Args:
        scores: (B, L, N + 1) student scores.
        candidates: (B, L, K) teacher top-K ids.
        weights: (B, L, K) importance weights.
        negatives: (B, L) one sampled negative per prefix.
        mask: (B, L) bool, prefixes that count.
    """
    pos = scores.gather(-1, candidates)  # (B, L, K)
    neg = scores.gather(-1, negatives.unsqueeze(-1))  # (B, L, 1), shared by the K candidates (as the paper)
    per_prefix = (weights * ranking_bce(pos, neg)).sum(-1)  # (B, L)
    return per_prefix[mask].mean() if mask.any() else scores.sum() * 0.0


class CollaborativeEmbedding(nn.Module):
    """Parametrization of a student's `items.weight`: e + w * P(e^T) on every real item (padding row unchanged).

    Args:
        teacher_items: (N + 1, d_T) the teacher's item embeddings (frozen; a non-persistent buffer, so checkpoints
            hold only P).
        student_dim: d_S.
        weight: w (`--embed-distill`).
    """

    def __init__(self, teacher_items: torch.Tensor, student_dim: int, weight: float):
        super().__init__()
        self.proj = nn.Linear(teacher_items.shape[1], student_dim)
        self.register_buffer("teacher", teacher_items.detach().float().clone(), persistent=False)
        self.weight = weight
        real = torch.ones(teacher_items.shape[0], 1)
        real[0] = 0.0  # padding keeps the student's own row
        self.register_buffer("real", real, persistent=False)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return items + self.weight * self.real * self.proj(self.teacher)  # (N + 1, d_S)


class DLLM2RecDistiller(nn.Module):
    """A SASRec/GRU4Rec student trained with CE + lambda * L_rank, its item table optionally parametrized.

    `train_loss` takes the batch's user ids (`uses_users`) to look up their cached teacher rankings.

    Args:
        student: The RecModel being trained.
        candidates: (U, L, K) teacher top-K per training prefix (rows = all users, as `RecData.train_examples()`),
            or None when lambda = 0.
        distances: (U, L, K) teacher distances d_sk, or None.
        teacher_items: (N + 1, d_T) teacher item embeddings, or None when embed_distill = 0.
        gammas: Importance-weight mixture {position, confidence, consistency}.
        lam: lambda, the weight of L_rank.
        embed_distill: w of the collaborative embedding term (0: plain item table).
        position_beta, confidence_beta: Softmax temperatures.
    """

    uses_users = True

    def __init__(self, student: RecModel, candidates: torch.Tensor | None, distances: torch.Tensor | None,
                 teacher_items: torch.Tensor | None, *, gammas: dict[str, float], lam: float, embed_distill: float,
                 position_beta: float = 1.0, confidence_beta: float = 1.0):
        super().__init__()
        self.student = student
        self.gammas, self.lam = dict(gammas), lam
        self.position_beta, self.confidence_beta = position_beta, confidence_beta
        self.register_buffer("candidates", candidates, persistent=False)
        self.register_buffer("distances", distances, persistent=False)
        if embed_distill > 0:
            parametrize.register_parametrization(student.items, "weight", CollaborativeEmbedding(
                teacher_items, student.items.embedding_dim, embed_distill))

    def train_loss(self, inputs: torch.Tensor, targets: torch.Tensor, users: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, float]]:
        """(B, L) inputs and targets, (B,) user ids -> (CE + lambda * L_rank, {term: value})."""
        logits = self.student.logits(inputs)  # (B, L, N + 1)
        ce = next_item_ce(logits, targets)
        values = {"ce": float(ce.detach())}
        if self.lam == 0 or self.candidates is None:
            return ce, values
        width = inputs.shape[1]
        cand = self.candidates[users, :width]  # (B, L, K)
        k = cand.shape[-1]
        seen = prefix_seen(inputs, logits.shape[-1] - 1)  # (B, L, N + 1)
        w_cons = consistency_indicator(cand, top_unseen(logits.detach(), seen, k))  # (B, L, K)
        w_conf = confidence_weights(self.distances[users, :width], self.confidence_beta)
        w_pos = position_weights(k, self.position_beta).to(logits.device)
        weights = importance_weights(w_pos, w_conf, w_cons, self.gammas)
        mask = targets > 0
        rank = ranking_distillation_loss(logits.float(), cand, weights, sample_prefix_negatives(seen, targets), mask)
        total = ce + self.lam * rank
        values["rank-distill"] = float(rank.detach())
        values["teacher-overlap"] = float(w_cons[mask].mean()) if mask.any() else 0.0  # diagnostic, not a loss
        return total, values

    def fold(self) -> RecModel:
        """Write e + w * P(e^T) into the student's plain item table (no-op without embedding distillation)."""
        if parametrize.is_parametrized(self.student.items, "weight"):
            with torch.no_grad():
                parametrize.remove_parametrizations(self.student.items, "weight", leave_parametrized=True)
        return self.student
