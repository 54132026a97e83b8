"""Agreement of a student with its teacher on the same tokens: KL(teacher || student), top-1 and top-k overlap.

Both models read the same token blocks (the calibration contract); at every position that predicts a next token
(seq_len - 1 per block, the same positions perplexity scores) we compare the two next-token distributions:

- KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v)), in nats, averaged over positions;
- top-1 agreement: fraction of positions where both argmaxes are the same token;
- top-k overlap: |top-k(teacher) & top-k(student)| / k, averaged over positions.

KL is only defined when both models speak the same vocabulary and cut the text into the same tokens:
`check_compatible` refuses otherwise (different vocabulary size, or the teacher's tokenizer turns the data into
other token ids) with `TeacherMismatch`, so that a front end can say so and skip these rows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from surgery.data import TokenBlocks, cut_blocks, read_text, tokenize_text
from surgery.errors import UserError
from surgery.fingerprint import tokens_fingerprint
from surgery.metrics.common import ProgressFn, check_cancel, emit

_CHUNK = 256  # positions per float32 log_softmax (see perplexity._CHUNK)


class TeacherMismatch(UserError):
    """The teacher's vocabulary or tokenization differs from the student's: KL and top-k are undefined."""


@dataclass(frozen=True)
class AgreementResult:
    """How closely a student follows its teacher.

    Attributes:
        kl: mean KL(teacher || student) per position, nats.
        top1: fraction of positions with the same argmax.
        topk_overlap: mean |top-k(t) & top-k(s)| / k.
        top_k: k.
        positions: positions compared.
    """

    kl: float
    top1: float
    topk_overlap: float
    top_k: int
    positions: int


def vocab_size(config_dict: dict) -> int | None:
    """The logits width a config promises (`vocab_size`, also for GPT-2), or None when it does not say."""
    value = config_dict.get("vocab_size")
    if value is None and isinstance(config_dict.get("text_config"), dict):
        value = config_dict["text_config"].get("vocab_size")
    return int(value) if value is not None else None


def check_compatible(
    student_config: dict,
    teacher_config: dict,
    blocks: TokenBlocks,
    teacher_tokenizer,
    *,
    teacher_name: str = "the teacher",
    text: str | None = None,
) -> None:
    """Refuse a teacher whose vocabulary or tokenization differs from the student's.

    Args:
        student_config, teacher_config: config.json dicts of both models.
        blocks: The student's token blocks (from `load_blocks` with the student's tokenizer).
        teacher_tokenizer: The teacher's tokenizer (None when it has none).
        teacher_name: How to name the teacher in the message.
        text: The raw data text, when the caller already read it (else it is read again from blocks.source).

    Raises:
        TeacherMismatch: Different vocabulary size, no teacher tokenizer, or different token ids for the data.
    """
    vs, vt = vocab_size(student_config), vocab_size(teacher_config)
    if vs != vt:
        raise TeacherMismatch(
            f"{teacher_name} has a vocabulary of {vt} tokens but the model has {vs}: KL and top-k agreement are "
            "undefined, agreement rows skipped"
        )
    if teacher_tokenizer is None:
        raise TeacherMismatch(f"{teacher_name} has no tokenizer files: cannot check it cuts the data into the same "
                              "tokens, agreement rows skipped")
    ids = tokenize_text(read_text(blocks.source) if text is None else text, teacher_tokenizer)
    if ids.numel() < blocks.num_tokens or tokens_fingerprint(
        cut_blocks(ids, blocks.seq_len, blocks.num_tokens)
    ) != blocks.fingerprint:
        raise TeacherMismatch(
            f"{teacher_name} tokenizes the data differently from the model (different tokenizer): KL and top-k "
            "agreement are undefined, agreement rows skipped"
        )


def _compare(t_logits: torch.Tensor, s_logits: torch.Tensor, k: int) -> tuple[float, int, float]:
    """Sums over positions of KL(t||s), top-1 matches and top-k overlap fractions.

    Args:
        t_logits, s_logits: (B, P, V) logits at the compared positions.
        k: top-k size.
    """
    kl_sum, top1, overlap = 0.0, 0, 0.0
    for c0 in range(0, t_logits.shape[1], _CHUNK):
        t = torch.log_softmax(t_logits[:, c0 : c0 + _CHUNK].float(), dim=-1)  # (B, c, V)
        s = torch.log_softmax(s_logits[:, c0 : c0 + _CHUNK].float(), dim=-1)  # (B, c, V)
        kl_sum += float((t.exp() * (t - s)).sum())  # summed per chunk, accumulated as a Python float
        top1 += int((t.argmax(-1) == s.argmax(-1)).sum())
        tk, sk = t.topk(k, dim=-1).indices, s.topk(k, dim=-1).indices  # (B, c, k)
        hits = (tk.unsqueeze(-1) == sk.unsqueeze(-2)).any(-1).sum(-1)  # (B, c) shared tokens per position
        overlap += float(hits.sum()) / k
    return kl_sum, top1, overlap


@torch.inference_mode()
def agreement(
    student,
    teacher,
    blocks: TokenBlocks,
    *,
    top_k: int = 5,
    batch_size: int = 1,
    progress: ProgressFn = None,
    cancel: threading.Event | None = None,
    label: str = "",
) -> AgreementResult:
    """Compare the next-token distributions of `student` and `teacher` on the same blocks.

    Call `check_compatible` first: this function only checks that the logits have the same width.

    Args:
        student, teacher: Causal LMs in eval mode (any devices; the teacher's logits are moved to the student's).
        blocks: Token blocks (the student's; the teacher must tokenize the data the same way).
        top_k: k for the top-k overlap.
        batch_size: Blocks per forward pass.
        progress: Called with ProgressEvent("agreement", done, total) after each batch.
        cancel: Stop at the next batch and raise Cancelled when set.
        label: The model's name for progress events.

    Raises:
        TeacherMismatch: The logits differ in width.
        UserError: Bad top_k or batch size.
        Cancelled: `cancel` was set.
    """
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    s_dev = next(student.parameters()).device
    t_dev = next(teacher.parameters()).device
    kl_sum, top1, overlap, positions, done = 0.0, 0, 0.0, 0, 0
    emit(progress, "agreement", 0, blocks.num_blocks, model=label)
    for batch in blocks.batches(batch_size):  # (B, T)
        check_cancel(cancel)
        # every position but the last predicts a token of the block
        s_logits = student(input_ids=batch.to(s_dev), use_cache=False).logits[:, :-1]  # (B, T-1, V)
        t_logits = teacher(input_ids=batch.to(t_dev), use_cache=False).logits[:, :-1].to(s_dev)  # (B, T-1, V)
        if s_logits.shape[-1] != t_logits.shape[-1]:
            raise TeacherMismatch(
                f"the teacher's logits have {t_logits.shape[-1]} entries but the model's have {s_logits.shape[-1]}: "
                "agreement rows skipped"
            )
        if top_k > s_logits.shape[-1]:
            raise UserError(f"--top-k {top_k} is larger than the vocabulary ({s_logits.shape[-1]})")
        kl, t1, ov = _compare(t_logits, s_logits, top_k)
        kl_sum, top1, overlap = kl_sum + kl, top1 + t1, overlap + ov
        positions += s_logits.shape[0] * s_logits.shape[1]
        done += batch.shape[0]
        emit(progress, "agreement", done, blocks.num_blocks, model=label)
    return AgreementResult(kl_sum / positions, top1 / positions, overlap / positions, top_k, positions)
