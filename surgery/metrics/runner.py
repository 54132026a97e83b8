"""Evaluate a model (or several, side by side) and keep the numbers as records: what `workbench eval` and
`workbench compare` run, usable from a notebook, the TUI or a job.

For each kind of metric the record key is computed first (model fingerprint + data fingerprint + settings, see
records.py); a stored record with that key is reused, so weights are only loaded when something is missing.
Cheap checks come first (device, dtype, source, data, teacher vocabulary/tokenization), before any weight is read.

Order within one model: size, speed, perplexity, lm_eval, generation, rec, agreement. Agreement comes last so
that the teacher is never resident while speed (and its peak memory) is measured; `compare_sources` runs every
model's agreement in a second pass for the same reason.

Rec model directories (`surgery.metrics.rec`): an LLM recommender is an HF directory and gets every metric plus
the "rec" record (with --rec-data); a baseline (SASRec, GRU4Rec) is not a language model and gets only its size and
the "rec" record.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery.errors import UserError
from surgery.metrics.common import ProgressFn, check_cancel, device_name, emit
from surgery.metrics.kinds import DECODE_PROMPT, compute_kind, generation_settings
from surgery.metrics.records import DataRef, EvalRecord, ModelRef, RecordStore, now_iso, record_key

DEFAULT_SEQ_LEN = 2048


@dataclass
class EvalSettings:
    """Everything that decides which metrics run and how (the CLI flags of `workbench eval`)."""

    data: str | None = None
    text_field: str | None = None
    seq_len: int | None = None  # None: 2048, or the model's max_position_embeddings when smaller
    stride: int | None = None  # None: non-overlapping blocks
    max_tokens: int | None = None
    batch_size: int = 1
    teacher: str | None = None
    top_k: int = 5
    device: str = "cpu"
    dtype: str = "auto"
    speed: bool = True
    prompt_len: int | None = None  # None: 128, or half the model's context when that is smaller
    new_tokens: int = 16
    speed_batch: int = 4
    repeats: int = 3
    warmup: int = 1
    generate: int = 0
    gen_tokens: int = 32
    lm_eval: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    rec_data: str | None = None  # a prepared rec data directory: HR/NDCG/MRR of rec model directories
    rec_max_users: int | None = None  # None: every test user

    def check(self) -> None:
        """Reject impossible settings before anything is loaded.

        Raises:
            UserError: One line naming the flag.
        """
        from surgery.loading import check_device, parse_dtype

        check_device(self.device)
        parse_dtype(self.dtype)
        positive = {"--batch-size": self.batch_size, "--top-k": self.top_k, "--prompt-len": self.prompt_len,
                    "--new-tokens": self.new_tokens, "--speed-batch": self.speed_batch, "--repeats": self.repeats,
                    "--gen-tokens": self.gen_tokens, "--tokens": self.max_tokens, "--stride": self.stride,
                    "--lm-eval-limit": self.lm_eval_limit, "--rec-max-users": self.rec_max_users}
        for flag, value in positive.items():
            if value is not None and value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        if self.seq_len is not None and self.seq_len < 2:
            raise UserError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.data and not self.data.startswith("hf:"):
            from surgery.data import check_data_file

            check_data_file(self.data)
        if self.stride is not None and self.data is None:
            raise UserError("--stride needs --data (it sets the perplexity windows)")
        if self.teacher and not self.data:
            raise UserError("--teacher needs --data: agreement is measured on the data's tokens")
        if self.rec_max_users is not None and not self.rec_data:
            raise UserError("--rec-max-users needs --rec-data (it limits the users of the rec metrics)")
        if self.rec_data and not (Path(self.rec_data).expanduser() / "data.json").is_file():
            raise UserError(f"--rec-data {self.rec_data} is not a prepared rec data directory: make one with "
                            "`workbench rec prepare`")
        if self.generate:
            from surgery.metrics.generation import pick_prompts

            pick_prompts(self.generate)
        if self.lm_eval:
            from surgery.metrics.lm_eval_tasks import require_lm_eval

            require_lm_eval()


@dataclass
class ModelEval:
    """What one model's evaluation produced.

    Attributes:
        label: the model as the user named it.
        model: source + weights fingerprint.
        records: one record per kind that ran (or was reused), in the order of KINDS.
        reused: keys of records taken from the store instead of computed.
        skipped: kind -> one-line reason, for metrics that were asked for but could not be computed.
    """

    label: str
    model: ModelRef
    records: list[EvalRecord] = field(default_factory=list)
    reused: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)


class Teacher:
    """A teacher model, resolved and checked cheaply at once, its weights loaded on first use and kept."""

    def __init__(self, source: str, settings: EvalSettings, progress: ProgressFn = None):
        from surgery.loading import load_tokenizer, read_config
        from surgery.pipeline import source_fingerprint
        from surgery.sources import resolve_source

        self.source = source
        self.settings = settings
        self.resolved = resolve_source(source, allow_pickle=settings.allow_pickle,
                                       trust_remote_code=settings.trust_remote_code)
        self.config = read_config(self.resolved)
        emit(progress, "fingerprint", model=source, message="fingerprinting teacher weights")
        self.ref = ModelRef(source=source, fingerprint=source_fingerprint(self.resolved))
        self.tokenizer = load_tokenizer(self.resolved, trust_remote_code=settings.trust_remote_code)
        self._model = None

    def model(self, progress: ProgressFn = None):
        """The teacher's weights (loaded once, on the evaluation's device and dtype)."""
        if self._model is None:
            from surgery.loading import load_model

            emit(progress, "loading", model=self.source, message="loading teacher")
            self._model = load_model(self.resolved, dtype=self.settings.dtype, device=self.settings.device,
                                     allow_pickle=self.settings.allow_pickle,
                                     trust_remote_code=self.settings.trust_remote_code).model
        return self._model

    def release(self) -> None:
        """Drop the teacher's weights."""
        self._model = None
        _free_memory()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def max_positions(config: dict) -> int | None:
    """The model's context limit from its config (max_position_embeddings, n_positions), if it states one."""
    for cfg in (config, config.get("text_config") or {}):
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            if isinstance(cfg.get(name), int) and cfg[name] > 0:
                return cfg[name]
    return None


def effective_seq_len(settings: EvalSettings, config: dict) -> int:
    """--seq-len, else 2048 or the model's limit when smaller; refuses a window longer than the model's limit."""
    limit = max_positions(config)
    if settings.seq_len is None:
        return min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
    if limit and settings.seq_len > limit:
        raise UserError(f"--seq-len {settings.seq_len} is longer than the model's context ({limit} positions)")
    return settings.seq_len


def effective_prompt_len(settings: EvalSettings, config: dict) -> int:
    """--prompt-len, else 128 or half the model's context when smaller; refuses prompts that do not fit."""
    limit = max_positions(config)
    prompt_len = settings.prompt_len or (min(128, limit // 2) if limit else 128)
    if limit and max(prompt_len, DECODE_PROMPT) + settings.new_tokens > limit:
        raise UserError(f"--prompt-len {prompt_len} + --new-tokens {settings.new_tokens} exceed the model's "
                        f"context ({limit} positions)")
    return prompt_len


def _kinds(settings: EvalSettings, source: str | None = None) -> list[str]:
    from surgery.metrics.rec import is_rec_baseline, is_rec_model

    if source is not None and is_rec_baseline(source):  # not a language model: size and rec metrics only
        return ["size", "rec"] if settings.rec_data else ["size"]
    kinds = ["size"]
    if settings.speed:
        kinds.append("speed")
    if settings.data:
        kinds.append("perplexity")
    if settings.lm_eval:
        kinds.append("lm_eval")
    if settings.generate:
        kinds.append("generation")
    if settings.rec_data and source is not None and is_rec_model(source):
        kinds.append("rec")
    if settings.data and settings.teacher:
        kinds.append("agreement")
    return kinds


def evaluate_source(
    source: str,
    settings: EvalSettings,
    *,
    store: RecordStore | None = None,
    teacher: Teacher | None = None,
    kinds: list[str] | None = None,
    fresh: bool = False,
    progress: ProgressFn = None,
    cancel: threading.Event | None = None,
) -> ModelEval:
    """Evaluate one model: reuse stored records where the key matches, compute and store the rest.

    Args:
        source: A model directory, .gguf file, hub id or alias.
        settings: What to measure and how.
        store: Where records are read and written (None: nothing is reused or stored).
        teacher: For agreement; built from `settings.teacher` when None and the settings name one.
        kinds: Restrict to these kinds of metric (default: everything the settings ask for).
        fresh: Recompute even when a matching record exists (the new one replaces it).
        progress: Called with ProgressEvents.
        cancel: Stops at the next batch and raises Cancelled.

    Returns:
        A ModelEval; metrics that could not be computed are listed in `skipped` with the reason.

    Raises:
        UserError: Bad device/dtype/source/data/settings (found before any weight is loaded).
    """
    from surgery.data import load_blocks, read_text
    from surgery.loading import load_tokenizer, parse_dtype, read_config
    from surgery.metrics.agreement import TeacherMismatch, check_compatible
    from surgery.metrics.rec import (checked_rec_data, evaluate_baseline, is_rec_baseline, rec_data_ref,
                                     rec_metrics, rec_settings)
    from surgery.pipeline import source_fingerprint
    from surgery.sources import resolve_source

    settings.check()
    if store is not None:
        store.check_writable()
    wanted = [k for k in _kinds(settings, source) if kinds is None or k in kinds]
    rec_data = checked_rec_data(source, settings) if "rec" in wanted else None
    if is_rec_baseline(source):
        return evaluate_baseline(source, settings, wanted, rec_data, store, fresh, progress, cancel)
    emit(progress, "resolving", model=source, message="resolving source")
    resolved = resolve_source(source, allow_pickle=settings.allow_pickle, trust_remote_code=settings.trust_remote_code)
    config = read_config(resolved)
    dtype = str(parse_dtype(settings.dtype, config)).removeprefix("torch.")
    seq_len = effective_seq_len(settings, config)
    prompt_len = effective_prompt_len(settings, config) if settings.speed else None
    emit(progress, "fingerprint", model=source, message="fingerprinting weights")
    result = ModelEval(source, ModelRef(source=source, fingerprint=source_fingerprint(resolved)))

    blocks = data_ref = None
    if settings.data and {"perplexity", "agreement"} & set(wanted):
        tokenizer = load_tokenizer(resolved, trust_remote_code=settings.trust_remote_code)
        emit(progress, "tokenizing", model=source, message="tokenizing data")
        blocks = load_blocks(settings.data, tokenizer, seq_len, settings.max_tokens, text_field=settings.text_field)
        data_ref = DataRef(source=blocks.source, fingerprint=blocks.fingerprint, seq_len=blocks.seq_len,
                           blocks=blocks.num_blocks, tokens=blocks.num_tokens)
    own_teacher = "agreement" in wanted and teacher is None
    if "agreement" in wanted:
        teacher = teacher or Teacher(settings.teacher, settings, progress)
        try:
            check_compatible(config, teacher.config, blocks, teacher.tokenizer,
                             teacher_name=f"teacher {teacher.source}",
                             text=read_text(settings.data, text_field=settings.text_field))
        except TeacherMismatch as exc:
            result.skipped["agreement"] = str(exc)
            wanted.remove("agreement")

    device_type = torch.device(settings.device).type
    common = {"device": device_type, "dtype": dtype}
    specs = {
        "size": dict(settings={"context": seq_len, "rows": 2}),  # rows 2: formats + checkpoint bytes
        "speed": dict(common, device=settings.device, hardware=device_name(settings.device),
                      settings={"prompt_len": prompt_len, "new_tokens": settings.new_tokens,
                                "batch": settings.speed_batch, "repeats": settings.repeats,
                                "warmup": settings.warmup}),
        "perplexity": dict(common, data=data_ref, settings={"seq_len": seq_len, "stride": settings.stride}),
        "lm_eval": dict(common, settings={"tasks": list(settings.lm_eval), "limit": settings.lm_eval_limit}),
        "generation": dict(common, settings=generation_settings(settings)),
        "agreement": dict(common, data=data_ref, teacher=teacher.ref if teacher else None,
                          settings={"seq_len": seq_len, "top_k": settings.top_k}),
        "rec": dict(common, device=settings.device, hardware=device_name(settings.device),
                    data=rec_data_ref(rec_data, settings.rec_data) if rec_data else None,
                    settings=rec_settings(settings)),
    }
    loaded = None

    def compute(kind: str):
        nonlocal loaded
        if kind == "rec":
            return rec_metrics(source, rec_data, settings, dtype, source, progress, cancel)
        if kind != "size" and loaded is None:
            from surgery.loading import load_model

            emit(progress, "loading", model=source, message="loading weights")
            loaded = load_model(resolved, dtype=dtype, device=settings.device, allow_pickle=settings.allow_pickle,
                                trust_remote_code=settings.trust_remote_code)
        return compute_kind(kind, settings, resolved, loaded, blocks, teacher, seq_len, source, progress, cancel,
                            prompt_len=prompt_len)

    for kind in wanted:
        try:
            add_record(kind, specs[kind], result, store, fresh, cancel, compute)
        except TeacherMismatch as exc:
            result.skipped[kind] = str(exc)
    del loaded
    if own_teacher:
        teacher.release()
    _free_memory()
    return result


def add_record(kind: str, spec: dict, result: ModelEval, store: RecordStore | None, fresh: bool,
               cancel: threading.Event | None, compute) -> None:
    """Add the record of `kind` to `result`: the stored one when its key matches, else `compute(kind)`'s.

    `spec` holds the record's keyed fields (settings; data, teacher, device, hardware, dtype when they apply);
    `compute(kind)` returns (metrics, run details) and is only called when no stored record matches.
    """
    from surgery.pipeline import versions

    data = spec.get("data")
    key = record_key(kind, result.model.fingerprint, data_fingerprint=data.fingerprint if data else None,
                     teacher_fingerprint=spec["teacher"].fingerprint if spec.get("teacher") else None,
                     device=spec.get("device"), hardware=spec.get("hardware"), dtype=spec.get("dtype"),
                     settings=spec["settings"])
    old = store.get(kind, key) if store is not None and not fresh else None
    if old is not None and not any(m.is_noisy() for m in old.metrics):  # a noisy timing is measured again
        result.records.append(old)
        result.reused.add(key)
        return
    check_cancel(cancel)
    t0 = time.perf_counter()
    metrics, run = compute(kind)
    run = {**run, "seconds": round(time.perf_counter() - t0, 3), "threads": torch.get_num_threads()}
    record = EvalRecord(kind=kind, key=key, model=result.model, data=data, teacher=spec.get("teacher"),
                        device=spec.get("device"), hardware=spec.get("hardware"), dtype=spec.get("dtype"),
                        settings=spec["settings"], run=run, versions=versions(), created=now_iso(), metrics=metrics)
    if store is not None:
        store.put(record)
    result.records.append(record)


def compare_sources(
    sources: list[str],
    settings: EvalSettings,
    *,
    store: RecordStore | None = None,
    fresh: bool = False,
    progress: ProgressFn = None,
    cancel: threading.Event | None = None,
) -> list[ModelEval]:
    """Evaluate several models with the same settings, one at a time (each one's weights freed before the next).

    Agreement runs in a second pass, after every model's speed, so the teacher is never resident while speed and
    peak memory are measured.
    """
    if not sources:
        raise UserError("compare needs at least one model")
    settings.check()
    if store is not None:
        store.check_writable()
    from surgery.loading import read_config
    from surgery.metrics.rec import checked_rec_data, is_rec_baseline, is_rec_model
    from surgery.sources import resolve_source

    for source in sources:  # every source must be a model before the first one is evaluated
        if settings.rec_data and is_rec_model(source):
            checked_rec_data(source, settings)  # trained on other data: refused before anything runs
        if is_rec_baseline(source):
            continue
        config = read_config(resolve_source(source, allow_pickle=settings.allow_pickle,
                                            trust_remote_code=settings.trust_remote_code))
        effective_seq_len(settings, config)
        if settings.speed:
            effective_prompt_len(settings, config)
    results = [evaluate_source(s, settings, store=store, kinds=[k for k in _kinds(settings, s) if k != "agreement"],
                               fresh=fresh, progress=progress, cancel=cancel) for s in sources]
    if "agreement" in _kinds(settings):
        teacher = Teacher(settings.teacher, settings, progress)
        try:
            for res in results:
                extra = evaluate_source(res.label, settings, store=store, teacher=teacher, kinds=["agreement"],
                                        fresh=fresh, progress=progress, cancel=cancel)
                res.records += extra.records
                res.reused |= extra.reused
                res.skipped.update(extra.skipped)
        finally:
            teacher.release()
    return results
