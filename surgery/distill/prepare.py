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
from typing import TYPE_CHECKING, Any

import torch

from surgery.data import TokenBlocks
from surgery.distill.config import DistillConfig
from surgery.distill.losses import HiddenProjection, check_layer_map, default_layer_map
from surgery.errors import UserError

if TYPE_CHECKING:
    from surgery.distill.world import World

Progress = Callable[[str], None] | None


@dataclass
class JobCheck:
    """What `check_job` learned from the two configs.

    Attributes:
        pairs: (student block, teacher block) pairs for hidden losses, empty without hidden losses.
        projection: whether a learned projection student width -> teacher width is used.
        same_vocab: teacher and student share a vocabulary (size and, when both have one, tokenizer).
        teacher_shape / student_shape: `surgery.shapes.ModelShape` of each.
        teacher_path / student_path: resolved local directories (teacher_path None: the teacher is not on this
            machine and a complete teacher cache stands in for it).
        teacher_config / teacher_vocab: the teacher's config.json and tokenizer vocabulary hash.
        cache_manifest: cache.json of a complete teacher cache, None without one (yet).
    """

    pairs: list[tuple[int, int]]
    projection: bool
    same_vocab: bool
    teacher_shape: Any
    student_shape: Any
    teacher_path: Path | None
    student_path: Path
    warnings: list[str] = field(default_factory=list)
    teacher_config: dict = field(default_factory=dict)
    teacher_vocab: str | None = None
    cache_manifest: dict | None = None


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
    from surgery.distill.teacher_cache import read_manifest, vocab_hash

    student = resolve_source(cfg.student)
    s_shape = shape_from_config(read_config(student))
    s_vocab = vocab_hash(_tokenizer_vocab(student.path))
    cached = read_manifest(cfg.teacher_cache) if cfg.teacher_cache else None
    try:
        teacher = resolve_source(cfg.teacher)
        teacher_path: Path | None = teacher.path
        t_config, t_vocab = read_config(teacher), vocab_hash(_tokenizer_vocab(teacher.path))
    except UserError:
        if cached is None:
            raise
        # a complete teacher cache stands in for the teacher: this machine need not have it
        teacher_path, t_config, t_vocab = None, cached["teacher"]["config"], cached["teacher"]["tokenizer_vocab"]
    t_shape = shape_from_config(t_config)
    same_vocab = t_shape.vocab == s_shape.vocab and (t_vocab is None or s_vocab is None or t_vocab == s_vocab)
    widths_differ = t_shape.hidden != s_shape.hidden
    projection = widths_differ if cfg.projection is None else cfg.projection
    if not same_vocab and cfg.logit_losses:
        raise UserError(
            f"teacher and student have different vocabularies (sizes {t_shape.vocab} and {s_shape.vocab}): "
            f"logit losses ({', '.join(cfg.logit_losses)}) need the same vocabulary; "
            "use uld (--loss uld:1.0, cross-tokenizer) or hidden losses with a projection"
        )
    if not same_vocab and (cfg.on_policy > 0 or cfg.seq_kd):
        raise UserError("on_policy / seq_kd need a teacher with the student's vocabulary (its samples and scores "
                        "are read in the student's tokens)")
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
                    teacher_path, student.path, warnings, t_config, t_vocab, cached)


def check_cache_key(cfg: DistillConfig, check: JobCheck) -> None:
    """Check an existing teacher cache's key against the job (tokenizes the training data; loads no weights).

    Raises:
        UserError: The cache was made for another teacher, other training tokens or another k.
    """
    from surgery.data import load_blocks
    from surgery.distill.teacher_cache import check_key
    from surgery.fingerprint import weights_fingerprint
    from surgery.loading import load_tokenizer

    train = load_blocks(cfg.data, load_tokenizer(check.student_path), cfg.seq_len, cfg.max_tokens,
                        text_field=cfg.text_field)
    t_fp = weights_fingerprint(check.teacher_path) if check.teacher_path is not None else None
    check_key(check.cache_manifest, Path(cfg.teacher_cache), teacher_fingerprint=t_fp,
              data_fingerprint=train.fingerprint, k=cfg.top_k)


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
        cache: the opened teacher cache (then `teacher` is None), or None.
        teacher_tokenizer: the teacher's tokenizer for cross-vocabulary losses, else None.
    """

    teacher: Any
    student: Any
    tokenizer: Any
    train: TokenBlocks
    eval: TokenBlocks | None
    projection: HiddenProjection | None
    check: JobCheck
    fingerprints: dict[str, str]
    cache: Any = None
    teacher_tokenizer: Any = None


def prepare(cfg: DistillConfig, world: World, *, progress: Progress = None) -> Prepared:
    """Check the job, load both models on `world.device` (under FSDP: build them as skeletons, no weight read, which
    the trainer shards and fills from rank 0), tokenize training (and eval) text.

    With a teacher cache the teacher is loaded only to build a missing cache, and training always reads the cache
    (the run that builds it and every later run see the same numbers). The projection is built deterministically
    (identity init), so a resumed run rebuilds the same one before its checkpoint is loaded.
    """
    from surgery.data import load_blocks

    check = check_job(cfg)
    device = world.device
    weights_fingerprint = _fingerprinter(cfg, world)
    say = progress or (lambda _m: None)
    say("loading student" + (" (skeleton: rank 0 reads its weights when it is sharded)" if cfg.fsdp else ""))
    student = _load(check.student_path, cfg, device, skeleton=cfg.fsdp)
    student.model.train()
    teacher = None
    if cfg.teacher_cache is None or check.cache_manifest is None:
        say("loading teacher")
        # a teacher cache is built by the whole teacher (build_cache runs it unsharded)
        teacher = _load(check.teacher_path, cfg, device, skeleton=cfg.fsdp and cfg.teacher_cache is None)
        teacher.model.requires_grad_(False)
    tokenizer = student.tokenizer or (teacher.tokenizer if teacher is not None else None)
    if tokenizer is None:
        raise UserError("neither the student nor the teacher has tokenizer files: cannot tokenize the data")
    say("tokenizing data")
    train = load_blocks(cfg.data, tokenizer, cfg.seq_len, cfg.max_tokens, text_field=cfg.text_field)
    top = int(train.ids.max())
    if top >= check.student_shape.vocab or (check.same_vocab and top >= check.teacher_shape.vocab):
        raise UserError(f"the data has token id {top}, outside the vocabulary of the "
                        f"{'student' if top >= check.student_shape.vocab else 'teacher'}")
    evaluation = None
    if cfg.eval_data:
        evaluation = load_blocks(cfg.eval_data, tokenizer, cfg.eval_seq_len or cfg.seq_len, cfg.eval_tokens,
                                 text_field=cfg.text_field)
    projection = None
    if check.projection:
        projection = HiddenProjection([s for s, _ in check.pairs], check.student_shape.hidden,
                                      check.teacher_shape.hidden).to(device)
    t_fp = weights_fingerprint(check.teacher_path) if check.teacher_path is not None else None
    cache = None
    if cfg.teacher_cache is not None:
        cache = _teacher_cache(cfg, check, teacher, t_fp, train, device, say)
        t_fp = t_fp or cache.manifest["key"]["teacher_fingerprint"]
        teacher = None  # training reads the cache only, in the run that built it as in every later one
    teacher_tokenizer = None
    if cfg.cross_vocab_losses:
        teacher_tokenizer = teacher.tokenizer if teacher is not None else None
        if teacher_tokenizer is None or student.tokenizer is None:
            raise UserError("uld re-tokenizes the text for the teacher: both models need tokenizer files")
    fingerprints = {"teacher": t_fp, "student": weights_fingerprint(check.student_path)}
    return Prepared(None if teacher is None else teacher.model, student.model, tokenizer, train, evaluation,
                    projection, check, fingerprints, cache, teacher_tokenizer)


def _fingerprinter(cfg: DistillConfig, world: World) -> Callable[[Path], str]:
    """`weights_fingerprint`; under FSDP computed on rank 0 only and sent to the others (it hashes every byte of
    the weight files: every rank would read whole models again). A collective: every rank calls it alike."""
    from surgery.fingerprint import weights_fingerprint

    if not cfg.fsdp:
        return weights_fingerprint
    from surgery.distill.fsdp import rank0_only

    return lambda path: world.broadcast_text(rank0_only(world, lambda: weights_fingerprint(path)))


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any


def _load(path: Path, cfg: DistillConfig, device: torch.device, *, skeleton: bool) -> _Loaded:
    """A model and its tokenizer: loaded on `device`, or (`skeleton`, for FSDP) built with its parameters on the
    meta device, no weight read (the trainer shards it and fills the shards from rank 0: see
    surgery.distill.fsdp.shard_from_rank0); a cache-building teacher under FSDP is read whole to CPU."""
    from surgery.loading import load_model, load_tokenizer

    if not skeleton:
        loaded = load_model(str(path), dtype=cfg.dtype, device=str(torch.device("cpu") if cfg.fsdp else device))
        return _Loaded(loaded.model, loaded.tokenizer)
    from surgery.distill.fsdp import skeleton as build_skeleton
    from surgery.inspect import check_config_against_weights
    from surgery.sources import resolve_source

    check_config_against_weights(resolve_source(str(path)))  # headers only: a bad checkpoint fails on every rank
    return _Loaded(build_skeleton(path, cfg.dtype), load_tokenizer(path))


def _teacher_cache(cfg: DistillConfig, check: JobCheck, teacher, teacher_fp: str | None, train: TokenBlocks,
                   device: torch.device, say: Callable[[str], None]):
    """Open the job's teacher cache, building it first when the directory holds none (key checked either way)."""
    from surgery.distill.teacher_cache import build_cache, check_key, open_cache

    directory = Path(cfg.teacher_cache).expanduser()
    manifest = check.cache_manifest
    if manifest is None:
        say(f"building the teacher cache in {directory} (top {cfg.top_k}, {train.num_blocks} blocks)")
        manifest = build_cache(directory, teacher.model, teacher_source=cfg.teacher, teacher_fingerprint=teacher_fp,
                               teacher_config=check.teacher_config, teacher_vocab_hash=check.teacher_vocab,
                               blocks=train, k=cfg.top_k, device=device, progress=say)
    check_key(manifest, directory, teacher_fingerprint=teacher_fp, data_fingerprint=train.fingerprint, k=cfg.top_k)
    cache = open_cache(directory)
    say(f"teacher cache {directory}: {manifest['bytes_per_token']} bytes per token, {manifest['bytes']:,} bytes")
    return cache
