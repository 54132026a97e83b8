"""Everything a distillation run needs before its first step: checks, models, data.

`check_job` reads only config.json files and the data path, so a front end can refuse a bad job (different
vocabularies with a logit loss, a layer map naming a missing block, ...) before any process starts or any weight
is read. `prepare` then loads teacher and student, tokenizes the data (with the student's tokenizer: the student is
the model being trained; the teacher sees the same ids), and builds the hidden-state projection when needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.data import TokenBlocks
from surgery.distill.config import DistillConfig
from surgery.distill.losses import HiddenProjection, check_layer_map, default_layer_map
from surgery.errors import UserError

Progress = Callable[[str], None] | None


@dataclass
class JobCheck:
    """What `check_job` learned from the two configs.

    Attributes:
        pairs: (student block, teacher block) pairs for hidden losses, empty without hidden losses.
        projection: whether a learned projection student width -> teacher width is used.
        same_vocab: teacher and student share a vocabulary (size and, when both have one, tokenizer).
        teacher_shape / student_shape: `surgery.shapes.ModelShape` of each.
        teacher_path / student_path: resolved local directories.
    """

    pairs: list[tuple[int, int]]
    projection: bool
    same_vocab: bool
    teacher_shape: Any
    student_shape: Any
    teacher_path: Path
    student_path: Path
    warnings: list[str] = field(default_factory=list)


def _tokenizer_vocab(path: Path) -> dict | None:
    """The vocabulary in tokenizer.json (a cheap JSON read), or None when there is none."""
    import json

    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        vocab = json.loads(f.read_text(encoding="utf-8")).get("model", {}).get("vocab")
    except (OSError, ValueError):
        return None
    if isinstance(vocab, list):  # unigram models store [token, score] pairs
        return {i: tok[0] if isinstance(tok, list) else tok for i, tok in enumerate(vocab)}
    return vocab if isinstance(vocab, dict) else None


def check_job(cfg: DistillConfig) -> JobCheck:
    """Check a job against the models' config.json files and the data path; reads no weights.

    Raises:
        UserError: Different vocabularies with a logit loss (or a hidden loss without a projection); hidden states
            of different widths with projection turned off; a layer map naming a missing block; a missing data
            file or source.
    """
    from surgery.loading import read_config
    from surgery.shapes import shape_from_config
    from surgery.sources import resolve_source

    for name, src in (("data", cfg.data), ("eval data", cfg.eval_data)):
        if src and not src.startswith("hf:") and not Path(src).expanduser().is_file():
            raise UserError(f"no such {name} file: {src}")
    teacher = resolve_source(cfg.teacher)
    student = resolve_source(cfg.student)
    t_shape = shape_from_config(read_config(teacher))
    s_shape = shape_from_config(read_config(student))
    t_vocab, s_vocab = _tokenizer_vocab(teacher.path), _tokenizer_vocab(student.path)
    same_vocab = t_shape.vocab == s_shape.vocab and (t_vocab is None or s_vocab is None or t_vocab == s_vocab)
    widths_differ = t_shape.hidden != s_shape.hidden
    projection = widths_differ if cfg.projection is None else cfg.projection
    if not same_vocab and cfg.logit_losses:
        raise UserError(
            f"teacher and student have different vocabularies (sizes {t_shape.vocab} and {s_shape.vocab}): "
            f"logit losses ({', '.join(cfg.logit_losses)}) need the same vocabulary; "
            "use hidden losses with a projection"
        )
    if not same_vocab and cfg.hidden_losses and not projection:
        raise UserError("teacher and student have different vocabularies: hidden losses need a learned projection "
                        "(set \"projection\": true in the job file or pass --projection)")
    if widths_differ and cfg.hidden_losses and not projection:
        raise UserError(f"hidden widths differ (teacher {t_shape.hidden}, student {s_shape.hidden}) and the "
                        "projection is turned off: hidden losses need it")
    pairs: list[tuple[int, int]] = []
    if cfg.hidden_losses:
        mapping = cfg.hidden_layers or default_layer_map(s_shape.num_layers, t_shape.num_layers)
        pairs = check_layer_map(mapping, s_shape.num_layers, t_shape.num_layers)
    warnings = []
    if cfg.hidden_layers and not cfg.hidden_losses:
        warnings.append("hidden_layers is set but no hidden loss has a weight: it is ignored")
    return JobCheck(pairs, bool(projection and cfg.hidden_losses), same_vocab, t_shape, s_shape,
                    teacher.path, student.path, warnings)


@dataclass
class Prepared:
    """Loaded models and data of a run.

    Attributes:
        teacher: eval mode, requires_grad off.
        student: train mode.
        tokenizer: the student's (else the teacher's) tokenizer.
        train: training blocks, (n, seq_len).
        eval: evaluation blocks or None.
        projection: learned hidden-state maps, or None.
        check: what `check_job` found.
        fingerprints: {"teacher": ..., "student": ...} weight fingerprints of the sources.
    """

    teacher: Any
    student: Any
    tokenizer: Any
    train: TokenBlocks
    eval: TokenBlocks | None
    projection: HiddenProjection | None
    check: JobCheck
    fingerprints: dict[str, str]


def prepare(cfg: DistillConfig, device: torch.device, *, progress: Progress = None) -> Prepared:
    """Check the job, load both models on `device`, tokenize training (and eval) text.

    The projection is built deterministically (identity init), so a resumed run rebuilds the same one before its
    checkpoint is loaded.
    """
    from surgery.data import load_blocks
    from surgery.fingerprint import weights_fingerprint
    from surgery.loading import load_model

    check = check_job(cfg)
    say = progress or (lambda _m: None)
    say("loading teacher")
    teacher = load_model(str(check.teacher_path), dtype=cfg.dtype, device=str(device))
    say("loading student")
    student = load_model(str(check.student_path), dtype=cfg.dtype, device=str(device))
    teacher.model.requires_grad_(False)
    student.model.train()
    tokenizer = student.tokenizer or teacher.tokenizer
    if tokenizer is None:
        raise UserError("neither the student nor the teacher has tokenizer files: cannot tokenize the data")
    say("tokenizing data")
    train = load_blocks(cfg.data, tokenizer, cfg.seq_len, cfg.max_tokens, text_field=cfg.text_field)
    top = int(train.ids.max())
    if top >= check.teacher_shape.vocab or top >= check.student_shape.vocab:
        raise UserError(f"the data has token id {top}, outside the vocabulary of the "
                        f"{'teacher' if top >= check.teacher_shape.vocab else 'student'}")
    evaluation = None
    if cfg.eval_data:
        evaluation = load_blocks(cfg.eval_data, tokenizer, cfg.seq_len, cfg.eval_tokens, text_field=cfg.text_field)
    projection = None
    if check.projection:
        projection = HiddenProjection([s for s, _ in check.pairs], check.student_shape.hidden,
                                      check.teacher_shape.hidden).to(device)
    fingerprints = {"teacher": weights_fingerprint(check.teacher_path),
                    "student": weights_fingerprint(check.student_path)}
    return Prepared(teacher.model, student.model, tokenizer, train, evaluation, projection, check, fingerprints)
