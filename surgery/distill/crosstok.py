"""Cross-tokenizer distillation: the teacher reads the same text in its own tokens, and positions are paired where
both models predict after exactly the same characters.

Why this alignment: a next-token distribution is a prediction of "what text follows this prefix". Student
position i has read the text up to character e_s(i) (the end of its token i); teacher position j has read up to
e_t(j). Where e_s(i) == e_t(j), both condition on the same prefix, so comparing their predictions is meaningful
even though the tokens they predict are pieces of different lengths. Positions whose boundary the other tokenizer
does not share are left out (with two BPE vocabularies of English text most word boundaries are shared). The ULD
loss (`losses.uld`) then compares the sorted distributions at the paired positions, which tolerates the
different granularity of the predicted pieces (Boizard et al. 2024 pair positions by index, which drifts apart as
soon as the tokenizations differ in length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def token_ends(tokenizer, ids: list[int], text: str) -> list[int]:
    """End character offset in `text` of each token of `ids` (text = tokenizer.decode(ids)).

    Re-encoding `text` with offsets gives them directly when it reproduces `ids` (byte-level BPE on ordinary
    text); otherwise the length of each decoded prefix is used (a token that splits a character gets its end at
    the next complete character, and may share no boundary with the teacher).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) == list(ids):
        return [end for _, end in enc["offset_mapping"]]
    return [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]


@dataclass
class AlignedBatch:
    """The teacher's view of a student micro-batch.

    Attributes:
        teacher_ids: (B, T) teacher token ids of each row's text, right-padded.
        attention_mask: (B, T), 1 on real tokens.
        rows / student_pos / teacher_pos: (N,) int64 each: the N aligned position pairs.
    """

    teacher_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    student_pos: torch.Tensor
    teacher_pos: torch.Tensor


def align_batch(student_ids: torch.Tensor, student_tok, teacher_tok, pad_id: int = 0) -> AlignedBatch:
    """Re-tokenize each row of `student_ids` (B, S) for the teacher and pair the positions with equal text ends."""
    rows_ids, pairs = [], []
    for b, row in enumerate(student_ids.tolist()):
        text = student_tok.decode(row)
        s_ends = token_ends(student_tok, row, text)
        enc = teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        t_ends = {end: j for j, (_, end) in enumerate(enc["offset_mapping"])}
        rows_ids.append(list(enc["input_ids"]))
        pairs += [(b, i, t_ends[e]) for i, e in enumerate(s_ends) if e in t_ends and e > 0]
    width = max(1, max(len(r) for r in rows_ids))
    teacher_ids = torch.full((len(rows_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for b, r in enumerate(rows_ids):
        teacher_ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    index = torch.tensor(pairs, dtype=torch.long).view(-1, 3)
    return AlignedBatch(teacher_ids, mask, index[:, 0], index[:, 1], index[:, 2])
