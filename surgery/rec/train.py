"""Rec training as a job: a job file, an event log, atomic checkpoints, resume and cancel.

A rec job uses the `surgery.jobs` directory layout and files (job.json, events.jsonl with the same event types,
checkpoints/step-N/ in safetensors + JSON, the `cancel` file, the lock), so `workbench jobs list/show/cancel` and the
TUI's jobs panel see it like a distillation job. Its job file is a `RecJob` (kind "rec-train"); it is run by
`run_rec_job` (in the foreground, or detached through `python -m surgery.rec JOBDIR`).

One step = one batch of users; each epoch visits the training users in a seeded order (seed, epoch), so a resumed
job sees exactly the batches it would have seen. Each batch is cut to its longest sequence.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from surgery.errors import UserError

JOB_VERSION = 1


class RecJob(BaseModel):
    """The job file of one rec training run (version 1)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # --lr inf would train NaNs to "done"

    version: int = JOB_VERSION
    kind: Literal["rec-train"] = "rec-train"
    model: Literal["sasrec", "gru4rec", "llm", "distill", "dllm2rec"]
    data: str = Field(description="prepared data directory (`workbench rec prepare`)")
    out: str
    overwrite: bool = False
    epochs: int = Field(default=1, ge=1)
    max_users: int | None = Field(default=None, ge=1, description="train on this many users (seeded choice)")
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 0
    steps: int = Field(default=0, ge=0, description="filled in when the job is created")
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=1, ge=1)
    device: str = "cpu"
    dtype: str = "float32"
    eval_users: int | None = Field(default=None, ge=1, description="validation users scored at the end")
    # baselines
    dim: int = Field(default=64, ge=1)
    layers: int = Field(default=2, ge=1)
    # LLM recommender
    backbone: str | None = None
    item_dim: int = Field(default=64, ge=1)
    lora: bool = False
    lora_rank: int = Field(default=8, ge=1)
    item_init: str | None = Field(default=None, description="rec model dir whose items.weight starts the table")
    freeze_items: bool = Field(default=False, description="keep the initialised item table fixed (E4SRec)")
    # distillation
    teacher: str | None = None
    student_layers: int | None = Field(default=None, ge=1)
    layer_pick: Literal["first", "spaced"] = "first"
    blocks: int | None = Field(default=None, ge=1)
    losses: dict[str, float] = Field(default_factory=lambda: {"ce": 1.0})
    # DLLM2Rec (surgery.rec.dllm2rec): teacher = the LLM recommender, student = the baseline trained
    student: Literal["sasrec", "gru4rec"] | None = None
    top_k: int = Field(default=10, ge=1, description="teacher candidates per training prefix")
    rank_weights: dict[str, float] = Field(default_factory=lambda: {"position": 0.3, "confidence": 0.5,
                                                                      "consistency": 0.1})
    rank_lambda: float = Field(default=0.8, ge=0, description="weight of the ranking distillation loss")
    embed_distill: float = Field(default=0.2, ge=0, description="w in e + w * P(e_teacher)")
    position_beta: float = Field(default=1.0, gt=0)
    confidence_beta: float = Field(default=1.0, gt=0)
    teacher_cache: str | None = Field(default=None, description="teacher rankings file (default: workbench cache)")

    @model_validator(mode="after")
    def _needs(self) -> RecJob:
        if self.model == "llm" and not self.backbone:
            raise ValueError("an llm job needs a backbone")
        if self.item_init and self.model != "llm":
            raise ValueError("item_init is for the LLM recommender (rec train llm)")
        if self.freeze_items and not self.item_init:
            raise ValueError("freeze_items needs item_init (a random table kept fixed learns nothing)")
        if self.model == "distill" and (not self.teacher or not self.student_layers):
            raise ValueError("a distill job needs a teacher and student_layers")
        if self.model == "dllm2rec" and (not self.teacher or not self.student):
            raise ValueError("a dllm2rec job needs a teacher and a student (sasrec or gru4rec)")
        return self


def parse_job(data: dict, where: str = "rec job") -> RecJob:
    """Validate a decoded job file (all problems on one line).

    Raises:
        UserError: Unknown fields, bad values, a newer version.
    """
    if isinstance(data, dict) and isinstance(data.get("version"), int) and data["version"] > JOB_VERSION:
        raise UserError(f"{where} is version {data['version']}, newer than this workbench reads")
    try:
        return RecJob.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors()]
        raise UserError(f"{where}: " + "; ".join(problems)) from None


def train_users(num_users: int, max_users: int | None, seed: int) -> list[int]:
    """Every user, or a seeded choice of `max_users` of them (sorted)."""
    if max_users is None or max_users >= num_users:
        return list(range(num_users))
    pick = torch.randperm(num_users, generator=torch.Generator().manual_seed(seed))[:max_users]
    return sorted(pick.tolist())


def create_rec_job(cfg: RecJob, num_users: int, root: str | Path | None = None):
    """Make the job directory (steps filled in); returns its `surgery.jobs.store.JobDir`."""
    from surgery.jobs.store import create_job, jobs_root

    users = len(train_users(num_users, cfg.max_users, cfg.seed))
    cfg = cfg.model_copy(update={"steps": cfg.epochs * math.ceil(users / cfg.batch_size)})
    return create_job(jobs_root(root), json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True) + "\n",
                      kind="rec")


def _baseline(kind: str, cfg: RecJob, data):
    """A freshly initialised SASRec or GRU4Rec (seeded) for the job's data."""
    from surgery.rec.models import GRU4Rec, SASRec

    torch.manual_seed(cfg.seed)
    return (SASRec(data.num_items, data.max_len, dim=cfg.dim, layers=cfg.layers) if kind == "sasrec"
            else GRU4Rec(data.num_items, dim=cfg.dim, layers=cfg.layers))


def _build_dllm2rec(cfg: RecJob, data, progress=None, cancel=None):
    """(distiller, student, None, record) for a DLLM2Rec job; the teacher runs only when its rankings are not
    cached yet."""
    from surgery.rec.dllm2rec import DLLM2RecDistiller
    from surgery.rec.teacher_cache import load_or_build

    needs_rankings = cfg.rank_lambda > 0 and any(cfg.rank_weights.values())
    rankings = None
    if needs_rankings or cfg.embed_distill > 0:
        rankings = load_or_build(cfg.teacher, data, cfg.top_k, path=cfg.teacher_cache, device=cfg.device,
                                 dtype=cfg.dtype, progress=progress, cancel=cancel)
    student = _baseline(cfg.student, cfg, data)
    module = DLLM2RecDistiller(student, rankings.candidates if needs_rankings else None,
                               rankings.distances if needs_rankings else None,
                               rankings.items if rankings is not None else None, gammas=cfg.rank_weights,
                               lam=cfg.rank_lambda if needs_rankings else 0.0, embed_distill=cfg.embed_distill,
                               position_beta=cfg.position_beta, confidence_beta=cfg.confidence_beta).to(cfg.device)
    record = {"teacher": {"path": str(cfg.teacher), "fingerprint": rankings.key["teacher"] if rankings else None},
              "dllm2rec": {"top_k": cfg.top_k, "weights": cfg.rank_weights, "lambda": cfg.rank_lambda,
                           "embed_distill": cfg.embed_distill, "position_beta": cfg.position_beta,
                           "confidence_beta": cfg.confidence_beta,
                           "embedding": "e + w * P(e_teacher), folded into items.weight" if cfg.embed_distill > 0
                           else "plain",
                           "teacher_cache": None if rankings is None else {
                               "path": str(rankings.path), "hit": rankings.hit,
                               "candidates": rankings.key["candidates"]}}}
    return module, student, None, record


def build(cfg: RecJob, data, progress=None, cancel=None):
    """(trainable module, model to save, tokenizer, record fields) for a job.

    `cancel` (anything with `is_set()`) is polled by the one long step before training: DLLM2Rec's teacher rankings.
    """
    say = progress or (lambda _m: None)
    if cfg.model in ("sasrec", "gru4rec"):
        model = _baseline(cfg.model, cfg, data)
        return model, model, None, {}
    if cfg.model == "dllm2rec":
        return _build_dllm2rec(cfg, data, say, cancel)
    from surgery.rec.llm import LLMRec, add_lora, pick_layers, shallow_copy

    if cfg.model == "llm":
        from surgery.loading import load_model
        from surgery.pipeline import source_fingerprint

        say(f"loading {cfg.backbone}")
        loaded = load_model(cfg.backbone, dtype=cfg.dtype, device=cfg.device)
        torch.manual_seed(cfg.seed)
        model = LLMRec(loaded.model, data.num_items, item_dim=cfg.item_dim, max_len=data.max_len).to(cfg.device)
        record = {"backbone": {"source": cfg.backbone, "fingerprint": source_fingerprint(loaded.resolved)}}
        if cfg.item_init:
            from surgery.rec.llm import item_table

            table, record["item_init"] = item_table(cfg.item_init, data, cfg.item_dim)
            with torch.no_grad():
                model.items.weight.copy_(table)
            model.items.weight.requires_grad_(not cfg.freeze_items)  # frozen: left out of the optimiser
            record["item_init"]["frozen"] = cfg.freeze_items
        if cfg.lora:
            add_lora(model, cfg.lora_rank)
        return model, model, loaded.tokenizer, record
    if cfg.lora:
        raise UserError("LoRA is not supported for distillation yet: the student is fully fine-tuned (drop --lora)")
    from surgery.rec.distill import SLMRecDistiller
    from surgery.rec.store import check_same_data, load_rec_model

    say(f"loading the teacher {cfg.teacher}")
    teacher, doc, tokenizer = load_rec_model(cfg.teacher, device=cfg.device, dtype=cfg.dtype)
    if teacher.kind != "llm":
        raise UserError(f"the teacher {cfg.teacher} is a {teacher.kind} model: distillation needs an LLM recommender")
    check_same_data(doc, data, "the teacher", cfg.data)
    keep = pick_layers(teacher.num_layers, cfg.student_layers, cfg.layer_pick)
    student = shallow_copy(teacher, keep)
    torch.manual_seed(cfg.seed)
    module = SLMRecDistiller(teacher, student, cfg.losses, cfg.blocks)
    record = {"teacher": {"path": str(cfg.teacher), "layers": teacher.num_layers}, "student_layers_kept": keep,
              "losses": module.losses, "block_pairs": module.pairs, "backbone": doc.get("backbone")}
    return module, student, tokenizer, record


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    state = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()
               if isinstance(v, torch.Tensor)}
    return tensors, state["param_groups"]


def _load_optim(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def check_finite(step: int, values: dict[str, float], lr: float, last_checkpoint: str | None) -> None:
    """Stop a run whose loss, gradient norm or weights became NaN/inf (`step` 1-based) before they reach a
    checkpoint or the output: one line naming the step, the values and what to try.

    Raises:
        TrainingDiverged: Any value not finite (the distillation loop's error, so jobs fail the same way).
    """
    from surgery.distill.loop import TrainingDiverged

    bad = {name: v for name, v in values.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{name} = {v}" for name, v in bad.items())
        kept = (f"the last checkpoint ({last_checkpoint}) is intact" if last_checkpoint
                else "no checkpoint was written yet")
        raise TrainingDiverged(f"training diverged at step {step}: {what}; start again with a lower --lr "
                               f"(it was {lr:g}); {kept}, nothing was saved to the output")


class _CancelSignal:
    """`is_set()` when the job's cancel file exists (workbench jobs/rec cancel) or the caller's event is set."""

    def __init__(self, cancel_file: Path, event: threading.Event | None):
        self.cancel_file, self.event = cancel_file, event

    def is_set(self) -> bool:
        return self.cancel_file.exists() or (self.event is not None and self.event.is_set())


def run_rec_job(path: str | Path, *, progress: Callable[[str], None] | None = None,
                cancel: threading.Event | None = None) -> dict:
    """Run (or resume) the rec job in directory `path` in this process; returns its final event.

    The final event is `done` (with the output path and validation metrics), `cancelled` (after a checkpoint)
    or `failed` (the error is re-raised after it is logged).
    """
    from surgery.jobs.checkpoint import latest_checkpoint, save_checkpoint
    from surgery.jobs.events import EventLog
    from surgery.jobs.runner import LOCK_FD_ENV, acquire_lock, write_process_record
    from surgery.jobs.store import JobDir
    from surgery.rec.data import load_rec_data
    from surgery.rec.metrics import evaluate
    from surgery.rec.store import save_rec_model
    from surgery.rec.teacher_cache import RankingsCancelled

    job = JobDir(Path(path).resolve())
    log = EventLog(job.events_file)
    say = progress or (lambda _m: None)
    stop = _CancelSignal(job.cancel_file, cancel)  # polled by the ranking build and by every step
    lock_fd = None if LOCK_FD_ENV in os.environ else acquire_lock(job)
    step = 0
    try:
        if lock_fd is not None:
            write_process_record(job, os.getpid(), command="foreground", attempt=None)
            log.append("launch", pid=os.getpid(), attempt=None, nproc=1, resume=False)
        cfg = parse_job(json.loads(job.job_file.read_text(encoding="utf-8")), str(job.job_file))
        data = load_rec_data(cfg.data)
        try:
            module, model, tokenizer, record = build(cfg, data, say, stop)
        except RankingsCancelled:  # stopped before the first step: nothing to checkpoint, resume starts over
            return log.append("cancelled", sync=True, step=0, checkpoint=None)
        users = train_users(data.num_users, cfg.max_users, cfg.seed)
        inputs, targets = data.train_examples(users)  # (U, L) each
        user_ids = torch.tensor(users, dtype=torch.long)  # row -> user id
        per_epoch = math.ceil(len(users) / cfg.batch_size)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        found = latest_checkpoint(job.checkpoints_dir)
        epoch_seconds: list[float] = []
        if found is not None:
            ckpt, tensors, meta = found
            module.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("student.")})
            _load_optim(opt, tensors, meta["param_groups"])
            torch.set_rng_state(tensors["rng.cpu"])  # dropout draws continue exactly where they stopped
            step, epoch_seconds = meta["step"], meta.get("epoch_seconds", [])
        last_ckpt = found[0].name if found else None
        log.append("start", step=step, pid=os.getpid(), world_size=1, resumed_from=found[0].name if found else None,
                   device=cfg.device, train={"users": len(users), **data.describe()})

        def checkpoint(n: int) -> str:
            nonlocal last_ckpt
            tensors = {f"student.{k}": v for k, v in module.state_dict().items()}  # tied weights: save_checkpoint
            optim, groups = _optim_tensors(opt)
            p = save_checkpoint(job.checkpoints_dir, n, {**tensors, **optim, "rng.cpu": torch.get_rng_state()},
                                {"param_groups": groups, "epoch_seconds": epoch_seconds},
                                keep=cfg.keep_checkpoints)
            log.append("checkpoint", step=n, path=str(p.relative_to(job.path)))
            last_ckpt = p.name
            return p.name

        t_epoch = time.perf_counter()
        while step < cfg.steps:
            if stop.is_set():
                name = checkpoint(step)
                return log.append("cancelled", sync=True, step=step, checkpoint=name)
            epoch, pos = divmod(step, per_epoch)
            order = torch.randperm(len(users), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
            idx = order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
            width = max(1, int((targets[idx] > 0).sum(1).max()))  # longest sequence in the batch
            x, y = inputs[idx, :width].to(cfg.device), targets[idx, :width].to(cfg.device)
            t0 = time.perf_counter()
            module.train()
            if getattr(module, "uses_users", False):  # DLLM2Rec looks up the batch's cached teacher rankings
                loss, terms = module.train_loss(x, y, users=user_ids[idx].to(cfg.device))
            else:
                loss, terms = module.train_loss(x, y)
            terms.setdefault("total", float(loss.detach()))
            check_finite(step + 1, terms, cfg.lr, last_ckpt)  # before backward: a NaN step never reaches the weights
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            check_finite(step + 1, {"gradient norm": grad_norm}, cfg.lr, last_ckpt)
            opt.step()
            # finite gradients can still push a weight past float range (an absurd --lr)
            check_finite(step + 1, {"weight norm": float(torch.nn.utils.get_total_norm(params))}, cfg.lr, last_ckpt)
            step += 1
            seconds = time.perf_counter() - t0
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.append("step", step=step, losses=terms, lr=cfg.lr, grad_norm=round(grad_norm, 4),
                           tokens_per_s=round(int((y > 0).sum()) / seconds, 1), epoch=round(step / per_epoch, 4),
                           eta_s=round(seconds * (cfg.steps - step), 1))
                say(f"step {step}/{cfg.steps} loss {terms['total']:.4f}")
            if step % per_epoch == 0:
                epoch_seconds.append(round(time.perf_counter() - t_epoch, 3))
                t_epoch = time.perf_counter()
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint(step)
        say("validating")
        model.eval()
        valid = evaluate(model.score, data, split="valid", protocols=("full",),
                         users=None if cfg.eval_users is None else list(range(min(cfg.eval_users, data.num_users))))
        log.append("eval", step=step, **valid["full"])
        if cfg.lora:
            from surgery.rec.llm import merge_lora

            merge_lora(model)
        if hasattr(module, "fold"):  # DLLM2Rec: e + w * P(e_teacher) becomes the plain item table
            module.fold()
        from surgery.estimate import count_params

        full_record = {**record, "data": {**data.describe(), "path": str(cfg.data)}, "job": job.id,
                       "train": {**cfg.model_dump(mode="json"), "train_users": len(users),
                                 "epoch_seconds": epoch_seconds},
                       "params": count_params(model), "valid": valid["full"]}
        say(f"saving to {cfg.out}")
        from surgery.rec.store import is_rec_dir, read_rec_json

        out = Path(cfg.out).expanduser()
        owned = out.is_dir() and is_rec_dir(out) and read_rec_json(out).get("job") == job.id
        save_rec_model(model, out, record=full_record, tokenizer=tokenizer, overwrite=cfg.overwrite or owned)
        return log.append("done", sync=True, step=step, output=str(out), eval=valid["full"])
    except BaseException as exc:
        lines = str(exc).strip().splitlines()
        log.append("failed", sync=True, step=step, error=lines[0] if lines else type(exc).__name__,
                   error_type=type(exc).__name__, traceback="".join(traceback.format_exception(exc))[-4000:])
        raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def start_rec_job(job) -> int:
    """Run the job in a detached process (own session and process group, survives the terminal); returns its pid.

    The launcher takes the job lock and hands the locked descriptor to the child (as `surgery.jobs.runner` does),
    so no second process can start the same job in between.
    """
    import sys

    from surgery.jobs.runner import launch_process

    proc = launch_process(job, [sys.executable, "-m", "surgery.rec", "run", str(job.path)], nproc=1, resume=False,
                          numbered=False)
    return proc.pid
