"""SLMRec depth distillation (Xu et al. 2024): a deep LLM recommender teaches a shallow copy of itself.

The student keeps k of the teacher's T blocks (`surgery.rec.llm.pick_layers`: the first k, or every m-th) and
starts from the teacher's weights. Its blocks are cut into B groups; at the boundary of group b the student's
residual stream (after student block b*S/B - 1) is matched to the teacher's (after teacher block b*T/B - 1).

    loss = w_ce * CE(next item)
         + w_cos * mean_b (1 - cos(h_s^b, h_t^b))          hidden-cos  (surgery.distill.losses.hidden_cos)
         + w_l2  * mean_b ||h_s^b - h_t^b||^2 / D           hidden-l2   (surgery.distill.losses.hidden_l2)
         + w_bce * mean_{b<B} CE(head_b(h_s^b) . E)         block-ce: a small head per inner boundary
                                                            (multiple supervision; the last boundary is the
                                                            student's own output, already under CE)

The hidden losses are the distillation issue's (`surgery.distill.losses`), averaged over boundaries and over
positions that have a target; the block outputs are captured with `surgery.distill.loop.capture_blocks`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from surgery.distill.loop import capture_blocks
from surgery.distill.losses import check_layer_map, hidden_loss
from surgery.errors import UserError
from surgery.rec.llm import LLMRec, decoder_layers
from surgery.rec.models import next_item_ce

REC_LOSSES = ("ce", "hidden-cos", "hidden-l2", "block-ce")


def parse_weights(text: str, names: tuple[str, ...], option: str, noun: str, example: str,
                  all_zero: str) -> dict[str, float]:
    """"a:1,b:0.1" -> {name: weight} for a weighted-terms option (a name without ":w" weighs 1).

    Args:
        names: Allowed names. option: The option's flag, for messages. noun: What a name is ("loss", "term").
        example: A valid value, shown with an unknown name. all_zero: The message when every weight is 0.

    Raises:
        UserError: An unknown name, a weight that is not a non-negative number, or every weight 0.
    """
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition(":")
        if name not in names:
            raise UserError(f"unknown {noun} {name!r} in {option}: use {', '.join(names)} (e.g. {example})")
        if name in out:  # a:1,a:2 would silently become a:2
            raise UserError(f"{option} names {name} twice: give each {noun} once")
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise UserError(f"{option} weight for {name} is not a number: {value!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"{option} weight for {name} must be a finite number >= 0 (got {weight})")
        out[name] = weight
    if not any(out.values()):
        raise UserError(all_zero)
    return out


def parse_losses(text: str) -> dict[str, float]:
    """"ce:1,hidden-cos:1,hidden-l2:0.1,block-ce:0.1" -> {name: weight} (see `parse_weights`)."""
    return parse_weights(text, REC_LOSSES, "--loss", "loss", "ce:1,hidden-cos:1",
                         "--loss gives every term weight 0: nothing to train")


def block_pairs(n_student: int, n_teacher: int, blocks: int) -> list[tuple[int, int]]:
    """(student block, teacher block) at each of `blocks` group boundaries: (b*S/B - 1, b*T/B - 1), b = 1..B.

    Raises:
        UserError: More groups than student blocks, or fewer than 1.
    """
    if not 1 <= blocks <= n_student:
        raise UserError(f"--blocks must be between 1 and the student's {n_student} layers (got {blocks})")
    mapping = {b * n_student // blocks - 1: b * n_teacher // blocks - 1 for b in range(1, blocks + 1)}
    return check_layer_map(mapping, n_student, n_teacher)


class SLMRecDistiller(nn.Module):
    """The trainable student (plus its block heads) and a frozen teacher; `train_loss` gives every term.

    The teacher is deliberately not a registered submodule: `parameters()` and `state_dict()` (what the optimizer
    and the checkpoints see) hold only the student and the heads.

    Args:
        teacher: The deep LLMRec (frozen, eval mode).
        student: The shallow LLMRec being trained.
        losses: {name: weight} over REC_LOSSES.
        blocks: Group boundaries B (default: the student's depth, i.e. every student block).
    """

    def __init__(self, teacher: LLMRec | None, student: LLMRec, losses: dict[str, float], blocks: int | None = None):
        super().__init__()
        self.student = student
        self.losses = {k: v for k, v in losses.items() if v > 0}
        needs_teacher = any(k in self.losses for k in ("hidden-cos", "hidden-l2"))
        if needs_teacher and teacher is None:
            raise UserError("hidden losses need a teacher")
        object.__setattr__(self, "_teacher", teacher if needs_teacher else None)
        if self._teacher is not None:
            self._teacher.eval().requires_grad_(False)
        n_t = teacher.num_layers if teacher is not None else student.num_layers
        self.pairs = block_pairs(student.num_layers, n_t, blocks or student.num_layers)
        width = student.lm.config.get_text_config().hidden_size
        item_dim = student.items.embedding_dim
        inner = [s for s, _ in self.pairs[:-1]]
        self.heads = nn.ModuleDict({str(s): nn.Linear(width, item_dim) for s in inner}
                                   if "block-ce" in self.losses else {})

    def train_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(B, L) inputs and targets -> (weighted total, {term: value, "total": value})."""
        mask = targets > 0  # (B, L) positions with a next item
        s_wanted = {s for s, _ in self.pairs}
        with capture_blocks(decoder_layers(self.student.lm), s_wanted) as s_states:
            states = self.student.hidden(inputs)  # (B, L, d)
        terms: dict[str, torch.Tensor] = {}
        if "ce" in self.losses:
            terms["ce"] = next_item_ce(states @ self.student.item_embeddings().t(), targets)
        if self._teacher is not None:
            with torch.no_grad(), capture_blocks(decoder_layers(self._teacher.lm), {t for _, t in self.pairs}) as t_states:
                self._teacher.hidden(inputs)
            for name in ("hidden-cos", "hidden-l2"):
                if name in self.losses:
                    terms[name] = hidden_loss(name, s_states, t_states, self.pairs, mask=mask)
        if self.heads:
            items = self.student.item_embeddings()  # (N + 1, d)
            per_block = [next_item_ce(head(s_states[int(s)].to(head.weight.dtype)) @ items.t(), targets)
                         for s, head in self.heads.items()]  # each (B, L, N + 1) -> scalar
            terms["block-ce"] = torch.stack(per_block).mean()
        total = sum(self.losses[k] * v for k, v in terms.items())
        values = {k: float(v.detach()) for k, v in terms.items()}
        values["total"] = float(total.detach())
        return total, values
