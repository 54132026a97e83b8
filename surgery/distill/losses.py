"""Distillation losses: pure functions on tensors, each with its shapes documented.

Logit losses (`kl`, `rkl`, `jsd`) compare the softened distributions softmax(z / T) of teacher and student at every
token position, sum over the vocabulary, average over positions, and are scaled by T^2 (Hinton et al. 2015) so that
their gradients keep the same size whatever the temperature. `top_k` keeps only the teacher's k largest logits (the
teacher distribution renormalised over them): a smaller teacher cache and less weight on its long tail.

`ce` is next-token cross-entropy on the data itself (hard labels).

`uld` is the Universal Logit Distillation loss (Boizard et al. 2024) for a teacher with another vocabulary: the L1
distance between the two probability vectors each sorted in decreasing order (zero-padded to the larger
vocabulary), the closed form of a Wasserstein distance when token identities are ignored. It is computed on
position pairs that `surgery.distill.crosstok` aligns by text (both models predict after the same characters).

`hidden_cos` / `hidden_l2` are SLMRec's block-wise feature distillation (Xu et al. 2024): the residual stream after
student block j is matched to the one after teacher block m(j) (`default_layer_map`: evenly spaced, the student's
last block on the teacher's last), optionally through a learned linear map (`HiddenProjection`) when widths differ.

Shapes: B batch, S sequence length, V vocabulary, D hidden width. Masks are (B, S) bool, True = position counts.
All losses are computed in float32 whatever the input dtype (bf16 logits lose too much in log_softmax).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import UserError

LOGIT_LOSSES = ("kl", "rkl", "jsd")  # need the same vocabulary
CROSS_VOCAB_LOSSES = ("uld",)  # any two vocabularies
HIDDEN_LOSSES = ("hidden-cos", "hidden-l2")
LOSS_NAMES = (*LOGIT_LOSSES, *CROSS_VOCAB_LOSSES, "ce", *HIDDEN_LOSSES)


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, S) per-position values -> scalar mean over the positions the mask keeps (all when None)."""
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def truncate_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each position, set the rest to -inf.

    Args:
        logits: (..., V).
        k: How many to keep; None or k >= V keeps everything.

    Returns:
        (..., V), same dtype; softmax of it is the distribution renormalised over the top k.
    """
    if k is None or k >= logits.shape[-1]:
        return logits
    if k < 1:
        raise ValueError(f"top_k must be at least 1 (got {k})")
    values, index = logits.topk(k, dim=-1)  # (..., k)
    return torch.full_like(logits, float("-inf")).scatter(-1, index, values)


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position: (B, S, V) log-probs -> (B, S).

    The common case (every log-prob finite, no top-k) takes three passes over the (B, S, V) tensors; when p has
    zeros (top-k truncation, or a model that masks tokens with -inf) the result is not finite and the exact path
    below is used instead.
    """
    fast = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, S)
    if bool(torch.isfinite(fast).all()):
        return fast
    return _kl_terms_exact(log_p, log_q)


def _kl_terms_exact(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position where p may have zeros: (B, S, V) -> (B, S).

    Terms where p = 0 are exactly 0. The -inf log-probs are replaced by 0 *before* any arithmetic (not masked
    afterwards with `where`), so neither the forward nor the backward pass ever sees inf - inf or 0 * inf.
    """
    support = torch.isfinite(log_p)
    log_p0 = log_p.masked_fill(~support, 0.0)
    log_q0 = log_q.masked_fill(~support, 0.0)  # q's value outside p's support is multiplied by p = 0 anyway
    return (log_p0.exp() * (log_p0 - log_q0)).masked_fill(~support, 0.0).sum(-1)


class _FusedKL(torch.autograd.Function):
    """T^2 * sum_pos w_pos * KL(p_t || p_s) with a closed-form backward: d/dz_s = T * w * (p_s - p_t).

    Autograd through log_softmax, sub and mul keeps several (B, S, V) tensors and runs as many passes backwards;
    this keeps two (teacher probabilities and student log-probabilities) and does the backward in place in three
    passes. On a 49k vocabulary the logit loss is the largest cost a distillation step adds (docs/jobs.md).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature: float, weights):  # noqa: D102
        log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, S, V)
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, S, V)
        p = log_p.exp()
        per = log_p.sub_(log_q).mul_(p).sum(-1)  # (B, S); log_p is not needed any more
        ctx.save_for_backward(log_q, p, weights)
        ctx.temperature, ctx.dtype = temperature, student_logits.dtype
        return (per * weights).sum() * temperature**2

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        log_q, p, weights = ctx.saved_tensors
        # in place on saved tensors: each is used once, and backward runs once (no retain_graph double use)
        g = log_q.exp_().sub_(p).mul_((weights * (grad * ctx.temperature)).unsqueeze(-1))  # (B, S, V)
        return g.to(ctx.dtype), None, None, None


def _position_weights(like: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, S) weights that turn a sum over positions into the (masked) mean."""
    if mask is None:
        return torch.full(like.shape[:2], 1.0 / (like.shape[0] * like.shape[1]), device=like.device)
    m = mask.to(torch.float32)
    return m / m.sum().clamp_min(1.0)


def kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL(teacher || student) on softmax(logits / T), times T^2 (Hinton 2015).

    Args:
        student_logits: (B, S, V).
        teacher_logits: (B, S, V), no gradient needed.
        temperature: T > 0.
        top_k: Truncate the teacher to its top k logits first (see `truncate_top_k`).
        mask: (B, S) bool, positions to average over.

    Returns:
        Scalar: mean over positions of sum_v p_t(v) (log p_t(v) - log p_s(v)), times T^2.
    """
    if top_k is None or top_k >= teacher_logits.shape[-1]:
        loss = _FusedKL.apply(student_logits, teacher_logits, temperature, _position_weights(student_logits, mask))
        if bool(torch.isfinite(loss)):
            return loss
        # not finite: the teacher gives some tokens zero probability (-inf logits): the exact path handles it
    log_t = _log_softmax(truncate_top_k(teacher_logits, top_k), temperature)  # (B, S, V)
    log_s = _log_softmax(student_logits, temperature)  # (B, S, V)
    return _token_mean(_kl_terms_exact(log_t, log_s), mask) * temperature**2


def rkl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse KL(student || teacher) on softmax(logits / T), times T^2 (mode-seeking).

    With `top_k`, the student is restricted to the teacher's top-k tokens as well (renormalised over them):
    outside them the teacher's probability is 0 and the reverse KL would be infinite.

    Args:
        student_logits: (B, S, V).
        teacher_logits: (B, S, V).
        temperature: T > 0.
        top_k: Truncate the teacher (and the student's support) to the teacher's top k.
        mask: (B, S) bool.

    Returns:
        Scalar: mean over positions of sum_v p_s(v) (log p_s(v) - log p_t(v)), times T^2.
    """
    teacher = truncate_top_k(teacher_logits, top_k)
    student = student_logits.float()
    if top_k is not None and top_k < teacher.shape[-1]:
        student = student.masked_fill(torch.isinf(teacher), float("-inf"))
    log_t = _log_softmax(teacher, temperature)
    log_s = _log_softmax(student, temperature)
    return _token_mean(_kl_terms(log_s, log_t), mask) * temperature**2


def jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024; TRL's `generalized_jsd_loss`), times T^2.

    M = beta * p_t + (1 - beta) * p_s; JSD_beta = beta * KL(p_t || M) + (1 - beta) * KL(p_s || M).
    beta = 0.5 is the symmetric JSD, bounded by ln 2 (at T = 1). As in TRL, the two ends are the KLs themselves
    (the mixture formula tends to 0 there): beta = 0 is forward KL(p_t || p_s), beta = 1 reverse KL(p_s || p_t).

    Args:
        student_logits: (B, S, V).
        teacher_logits: (B, S, V).
        beta: Interpolation between forward (0) and reverse (1) KL, 0 <= beta <= 1.
        temperature: T > 0.
        top_k: Truncate the teacher to its top k logits first.
        mask: (B, S) bool.

    Returns:
        Scalar, >= 0, 0 when the distributions agree.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be between 0 and 1 (got {beta})")
    if beta == 0.0:
        return kl(student_logits, teacher_logits, temperature=temperature, top_k=top_k, mask=mask)
    if beta == 1.0:
        return rkl(student_logits, teacher_logits, temperature=temperature, top_k=top_k, mask=mask)
    log_t = _log_softmax(truncate_top_k(teacher_logits, top_k), temperature)  # (B, S, V)
    log_s = _log_softmax(student_logits, temperature)  # (B, S, V)
    log_m = torch.logsumexp(
        torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0
    )  # (B, S, V); finite wherever p_s > 0, i.e. everywhere
    per_token = beta * _kl_terms(log_t, log_m) + (1.0 - beta) * _kl_terms(log_s, log_m)  # (B, S)
    return _token_mean(per_token, mask) * temperature**2


def uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
        top_k: int | None = None) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024): sum_i |sort(p_s)_i - sort(p_t)_i|, mean over positions.

    The two vocabularies may differ in size and meaning: each probability vector is sorted in decreasing order and
    the shorter one padded with zeros, so the loss compares the shapes of the distributions (how confident, how
    spread), not which token is which. Times T^2 like the other logit losses.

    Args:
        student_logits: (N, V_s) at N aligned positions.
        teacher_logits: (N, V_t) at the same positions (no gradient needed).
        temperature: T > 0.
        top_k: Compare only the k largest probabilities of each (the tail is near 0 and sorting it costs most).

    Returns:
        Scalar in [0, 2 T^2]; 0 when the sorted distributions agree.
    """
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"uld needs aligned positions: {student_logits.shape[0]} student rows, "
                         f"{teacher_logits.shape[0]} teacher rows")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0  # no aligned position in this batch: no signal, still differentiable
    p_s = torch.softmax(student_logits.float() / temperature, dim=-1)  # (N, V_s)
    p_t = torch.softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V_t)
    k = max(p_s.shape[-1], p_t.shape[-1]) if top_k is None else top_k

    def sorted_head(p: torch.Tensor) -> torch.Tensor:  # (N, V) -> (N, k), decreasing, zero-padded
        head = p.topk(min(k, p.shape[-1]), dim=-1).values  # topk is sorted and differentiable
        return F.pad(head, (0, k - head.shape[-1]))

    return (sorted_head(p_s) - sorted_head(p_t)).abs().sum(-1).mean() * temperature**2


def ce(student_logits: torch.Tensor, input_ids: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t + 1.

    Args:
        student_logits: (B, S, V).
        input_ids: (B, S) int64.
        mask: (B, S) bool over the *input* positions; a target counts when its position is kept.

    Returns:
        Scalar: mean over the B * (S - 1) targets of -log p_s(x_{t+1} | x_<=t).
    """
    b, s, v = student_logits.shape
    # shift the targets, not the logits: slicing (B, S, V) logits would make autograd allocate and copy a full
    # zero tensor of that size in the backward pass; the last position gets the ignored target -100 instead
    targets = torch.cat([input_ids[:, 1:], input_ids.new_full((b, 1), -100)], dim=1)  # (B, S)
    per_token = F.cross_entropy(student_logits.float().reshape(b * s, v), targets.reshape(-1), reduction="none",
                                ignore_index=-100).view(b, s)  # (B, S), 0 at the last position
    keep = torch.ones(b, s, dtype=torch.bool, device=input_ids.device)
    keep[:, -1] = False
    if mask is not None:
        keep[:, :-1] &= mask[:, 1:].to(keep.device)
    return _token_mean(per_token, keep)


def hidden_cos(student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - cosine similarity between hidden states, averaged over positions.

    Args:
        student: (B, S, D), already projected to the teacher's width if needed.
        teacher: (B, S, D).
        mask: (B, S) bool.

    Returns:
        Scalar in [0, 2]; 0 when every student vector points the teacher's way.
    """
    _same_shape(student, teacher)
    s, t = student.float(), teacher.float()
    # written out rather than F.cosine_similarity: fewer passes over (B, S, D) forwards and backwards, which
    # matters when every block of a 30-layer model is matched
    dot = (s * t).sum(-1)  # (B, S)
    norms = s.norm(dim=-1) * t.norm(dim=-1)  # (B, S)
    return _token_mean(1.0 - dot / norms.clamp_min(1e-8), mask)


def hidden_l2(student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared L2 distance ||h_s - h_t||^2 / D between hidden states (mean squared error), averaged over positions.

    Divided by D so the loss does not grow with the model width (one weight fits every model size).

    Args:
        student: (B, S, D).
        teacher: (B, S, D).
        mask: (B, S) bool.

    Returns:
        Scalar >= 0.
    """
    _same_shape(student, teacher)
    per_token = (student.float() - teacher.float()).pow(2).mean(-1)  # (B, S)
    return _token_mean(per_token, mask)


def _same_shape(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"hidden states differ in shape: student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)} (use a projection when widths differ)")


def default_layer_map(n_student: int, n_teacher: int) -> dict[int, int]:
    """Evenly spaced block map: student block j -> teacher block floor((j + 1) * n_t / n_s) - 1.

    With n_t = b * n_s this is every b-th teacher block (b - 1, 2b - 1, ...); the student's last block always
    maps to the teacher's last block.
    """
    return {j: max(0, (j + 1) * n_teacher // n_student - 1) for j in range(n_student)}


def check_layer_map(mapping: Mapping[int, int], n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Validate a student -> teacher block map; returns its (student, teacher) pairs sorted by student block.

    Raises:
        UserError: An empty map, or a block index either model does not have.
    """
    if not mapping:
        raise UserError("the hidden-loss layer map is empty: name at least one student:teacher pair")
    for s, t in mapping.items():
        if not 0 <= s < n_student:
            raise UserError(f"hidden-loss layer map names student layer {s} but the student has {n_student} "
                            f"layers (0-{n_student - 1})")
        if not 0 <= t < n_teacher:
            raise UserError(f"hidden-loss layer map names teacher layer {t} but the teacher has {n_teacher} "
                            f"layers (0-{n_teacher - 1})")
    return sorted(mapping.items())


class HiddenProjection(nn.Module):
    """One learned linear map per matched student block, student width -> teacher width (SLMRec).

    Initialised to the (rectangular) identity, so with equal widths training starts from "no projection", and the
    init needs no random numbers (a resumed job rebuilds it bit for bit before loading its checkpoint).
    """

    def __init__(self, student_layers: Sequence[int], student_width: int, teacher_width: int):
        super().__init__()
        self.maps = nn.ModuleDict()
        for j in student_layers:
            linear = nn.Linear(student_width, teacher_width, bias=False)
            with torch.no_grad():
                nn.init.eye_(linear.weight)  # (D_t, D_s)
            self.maps[str(j)] = linear

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """(B, S, D_s) -> (B, S, D_t)."""
        linear = self.maps[str(layer)]
        return linear(hidden.to(linear.weight.dtype))


def hidden_loss(
    kind: str,
    student_states: Mapping[int, torch.Tensor],
    teacher_states: Mapping[int, torch.Tensor],
    pairs: Sequence[tuple[int, int]],
    *,
    projection: HiddenProjection | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-wise feature loss averaged over the matched pairs.

    Args:
        kind: "hidden-cos" or "hidden-l2".
        student_states: student block index -> (B, S, D_s) output of that block.
        teacher_states: teacher block index -> (B, S, D_t).
        pairs: (student block, teacher block) pairs, from `check_layer_map`.
        projection: Maps D_s -> D_t per student block; required when D_s != D_t.
        mask: (B, S) bool.

    Returns:
        Scalar: mean over pairs of `hidden_cos` / `hidden_l2`.
    """
    fn = {"hidden-cos": hidden_cos, "hidden-l2": hidden_l2}[kind]
    students, teachers = [], []
    for s, t in pairs:
        h_s = student_states[s]  # (B, S, D_s)
        students.append(projection(s, h_s) if projection is not None else h_s)  # (B, S, D_t)
        teachers.append(teacher_states[t])
    # one computation over all pairs stacked, (P * B, S, D), instead of P small ones: every pair has the same
    # positions, so the mean over all of them is the mean of the per-pair means
    b, n = students[0].shape[:2]
    h_s = torch.stack(students).reshape(len(pairs) * b, n, -1)
    h_t = torch.stack(teachers).reshape(len(pairs) * b, n, -1)
    return fn(h_s, h_t, mask=None if mask is None else mask.repeat(len(pairs), 1))


def weighted_total(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """sum_i w_i * term_i over the named terms (the optimised loss)."""
    return sum(weights[name] * value for name, value in terms.items())
