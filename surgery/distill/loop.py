"""The distillation step and loop.

One optimizer step: the global batch of `batch_size` blocks is cut into `grad_accum` x `world.size` micro-batches;
for each, the teacher runs in `torch.inference_mode()` (no autograd state kept), the student in train mode, both
under bf16 autocast on GPU; every loss term is computed in float32, weighted, and back-propagated; gradients are
averaged over ranks by DDP, or reduce-scattered by FSDP (`fsdp`: student and teacher sharded, surgery.distill.fsdp);
then clipping and one AdamW step. Each term is returned separately for the event log.

Batches come from the data, or (on-policy steps, `on_policy` lambda) from continuations the student samples after
each block's prompt, or (`seq_kd`) from the teacher's own continuations; on sampled batches only the sampled
positions count. Which steps are on-policy is a pure function of the step (`is_on_policy_step`), and the sampler is
seeded per (seed, step, micro-batch, rank) (`surgery.distill.generate`).

Determinism: the data order is a pure function of (seed, step) (`sample_indices`), the learning rate a pure
function of the step (`lr_at`), and everything else that changes during training (weights, optimizer moments, RNG
states) is in `state()` / `load_state()`. So a run resumed from a checkpoint repeats the uninterrupted run exactly
on CPU with `deterministic` on.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from surgery.distill import losses as L
from surgery.distill.config import DistillConfig
from surgery.distill.prepare import Prepared
from surgery.distill.world import World
from surgery.errors import UserError


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed every RNG; with `deterministic`, ask torch for deterministic kernels (exact resume on CPU)."""
    if deterministic:
        # cuBLAS needs this before its first use to be deterministic; harmless on CPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(seed)
    torch.manual_seed(seed)


def lr_at(cfg: DistillConfig, step: int) -> float:
    """Learning rate of (0-based) `step`: linear warmup, then constant, linear decay or cosine decay to 0, or
    wsd (warmup-stable-decay: the peak held, then a linear decay over the last 20% of the steps)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay = max(1, round(0.2 * cfg.steps))
        return cfg.lr * min(1.0, (cfg.steps - step) / decay)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def sample_indices(num_blocks: int, batch_size: int, step: int, seed: int, shuffle: bool) -> torch.Tensor:
    """Block indices of the global batch of `step`: (batch_size,) int64.

    Sample g = step * batch_size + i is position g % n of epoch g // n; each epoch is a fresh permutation drawn
    from (seed, epoch) when shuffling, file order otherwise. A pure function: resuming needs only the step.
    """
    g = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, pos = g // num_blocks, g % num_blocks
    out = torch.empty_like(g)
    for e in epochs.unique().tolist():
        if shuffle:
            order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
        else:
            order = torch.arange(num_blocks)
        sel = epochs == e
        out[sel] = order[pos[sel]]
    return out


class TrainingDiverged(UserError):
    """A loss term or the gradient norm became non-finite: the job fails at that step instead of saving NaNs."""


def _check_finite(step: int, values: dict[str, float]) -> None:
    bad = {name: v for name, v in values.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{name} = {v}" for name, v in bad.items())
        raise TrainingDiverged(f"training diverged at step {step + 1}: {what} (lower --lr, the loss weights or "
                               "--temperature); the weights of the last checkpoint are intact")


def is_on_policy_step(step: int, fraction: float) -> bool:
    """Whether (0-based) `step` trains on student samples: exactly floor(n * fraction) of the first n steps are,
    spread evenly (a pure function of the step, so a resumed job makes the same choices)."""
    return math.floor((step + 1) * fraction) > math.floor(step * fraction)


@dataclass
class MicroBatch:
    """One micro-batch of token ids and where they came from.

    Attributes:
        ids: (B, S) int64.
        blocks: (B,) int64 indices of the training blocks the rows start from.
        source: "data", "student" (on-policy samples) or "teacher" (seq-kd samples).
        first_sampled: S - gen_tokens for sampled rows (positions before it are the prompt), None for data.
    """

    ids: torch.Tensor
    blocks: torch.Tensor
    source: str = "data"
    first_sampled: int | None = None

    def masks(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(prediction mask, target mask), (B, S) bool each, None for data batches (every position counts).

        On sampled rows the positions that predict a sampled token (first_sampled - 1 .. S - 2) count for the
        teacher losses, and the sampled tokens themselves (first_sampled .. S - 1) are the hard-label targets."""
        if self.first_sampled is None:
            return None, None
        p = self.first_sampled
        pred = torch.zeros(self.ids.shape, dtype=torch.bool, device=self.ids.device)
        pred[:, p - 1 : -1] = True
        target = torch.zeros_like(pred)
        target[:, p:] = True
        return pred, target


@contextlib.contextmanager
def capture_blocks(layers: nn.ModuleList, wanted: set[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output hidden states (B, S, D) of the decoder blocks in `wanted` during a forward pass."""
    states: dict[int, torch.Tensor] = {}
    handles = []
    for i in wanted:
        def hook(_module, _args, output, i=i):
            states[i] = output[0] if isinstance(output, tuple) else output

        handles.append(layers[i].register_forward_hook(hook))
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


@dataclass
class StepResult:
    """What one optimizer step reports: each weighted-in loss term, the total, lr, gradient norm, tokens."""

    losses: dict[str, float]
    lr: float
    grad_norm: float | None
    tokens: int
    source: str = "data"


class Trainer:
    """Student, teacher, optimizer and data of one run; `step(n)` runs optimizer step n."""

    def __init__(self, cfg: DistillConfig, prep: Prepared, world: World):
        from surgery.arch import spec_for_config
        from surgery.ops import get_module

        self.cfg, self.prep, self.world = cfg, prep, world
        self.student, self.teacher, self.projection = prep.student, prep.teacher, prep.projection
        from surgery.distill.world import check_world_size

        check_world_size(cfg.batch_size, cfg.grad_accum, world.size)
        if cfg.fsdp and not world.distributed:
            raise UserError("fsdp needs a process group: start the job through surgery.distill.world.init_world")
        self.sharded = cfg.fsdp  # FSDP2: parameters, gradients and optimizer state are sharded over the ranks
        self.micro = cfg.batch_size // (cfg.grad_accum * world.size)
        self.weights = {n: w for n, w in cfg.losses.items() if w > 0}
        self.pairs = prep.check.pairs if cfg.hidden_losses else []
        self.s_layers = get_module(self.student, spec_for_config(self.student.config).layers)
        self.t_layers = (None if self.teacher is None
                         else get_module(self.teacher, spec_for_config(self.teacher.config).layers))
        self.needs_logits = bool(cfg.logit_losses or cfg.cross_vocab_losses) or self.weights.get("ce", 0) > 0
        self.model: nn.Module = self.student
        self.ddp = world.distributed and not self.sharded
        self.student_class = type(self.student)  # fully_shard subclasses it; the output is saved as this class
        if self.sharded:
            from surgery.distill import fsdp

            policy = fsdp.mixed_precision(world, cfg.autocast)
            # the models are skeletons (prepare): one after the other, rank 0 reads each whole and sends the shards
            fsdp.shard_from_rank0(self.student, self.s_layers, world, policy,
                                  lambda: fsdp.read_full_state(prep.check.student_path, cfg.dtype))
            if self.teacher is not None:
                fsdp.shard_from_rank0(self.teacher, self.t_layers, world, policy,
                                      lambda: fsdp.read_full_state(prep.check.teacher_path, cfg.dtype))
        elif self.ddp:
            from torch.nn.parallel import DistributedDataParallel

            # with hidden losses only, lm_head (and blocks past the last matched one) get no gradient
            self.model = DistributedDataParallel(
                self.student, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                find_unused_parameters=not self.needs_logits,
            )
        params = list(self.student.parameters())
        if self.projection is not None:
            params += list(self.projection.parameters())
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.autocast = cfg.autocast and world.device.type == "cuda"

    # ------------------------------------------------------------------ one step

    def _autocast(self):
        return torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _frozen(self):
        """inference_mode for the teacher; no_grad under FSDP, whose one-rank all-gather cannot copy into the
        inference tensors inference_mode would make of its buffers (torch 2.13)."""
        return torch.no_grad() if self.sharded else torch.inference_mode()

    def step_source(self, step: int) -> str:
        """Where the batches of `step` come from: "student" (on-policy), "teacher" (seq-kd) or "data"."""
        if self.cfg.on_policy > 0 and is_on_policy_step(step, self.cfg.on_policy):
            return "student"
        return "teacher" if self.cfg.seq_kd else "data"

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This rank's micro-batches of `step`: grad_accum batches of (micro, seq_len) token ids."""
        from surgery.distill.generate import sample_continuations, sampling_generator

        cfg = self.cfg
        idx = sample_indices(self.prep.train.num_blocks, cfg.batch_size, step, cfg.seed, cfg.shuffle)
        source = self.step_source(step)
        out = []
        for m in range(cfg.grad_accum):
            start = (m * self.world.size + self.world.rank) * self.micro
            blocks = idx[start : start + self.micro]
            ids = self.prep.train.ids[blocks].to(self.world.device)
            if source == "data":
                out.append(MicroBatch(ids, blocks))
                continue
            first = cfg.seq_len - cfg.gen_tokens
            sampler = self.student if source == "student" else self.teacher
            ids = sample_continuations(sampler, ids[:, :first], cfg.gen_tokens,
                                       sampling_generator(cfg.seed, step, m, self.world.rank))
            out.append(MicroBatch(ids, blocks, source, first))
        return out

    def _teacher_logits(self, batch: MicroBatch, t_wanted: set[int]):
        """(teacher logits or None, teacher hidden states, aligned positions or None) for one micro-batch."""
        cfg = self.cfg
        if self.prep.cache is not None:
            return self.prep.cache.teacher_logits(batch.blocks, self.world.device), {}, None
        aligned = None
        kwargs = {"input_ids": batch.ids}
        if cfg.cross_vocab_losses and not self.prep.check.same_vocab:
            from surgery.distill.crosstok import align_batch

            aligned = align_batch(batch.ids.cpu(), self.prep.tokenizer, self.prep.teacher_tokenizer,
                                  pad_id=self.prep.teacher_tokenizer.pad_token_id or 0)
            kwargs = {"input_ids": aligned.teacher_ids.to(self.world.device),
                      "attention_mask": aligned.attention_mask.to(self.world.device)}
        need = bool(cfg.logit_losses or cfg.cross_vocab_losses)
        with capture_blocks(self.t_layers, t_wanted) as t_states, self._frozen(), self._autocast():
            t_out = self.teacher(**kwargs, use_cache=False, logits_to_keep=0 if need else 1)
        # inference tensors cannot be saved for backward: the hidden states enter differentiable ops directly,
        # so they are cloned into normal tensors (the logits only enter through new tensors, no copy needed)
        return t_out.logits, {k: v.clone() for k, v in t_states.items()}, aligned

    def loss_terms(self, batch: MicroBatch) -> dict[str, torch.Tensor]:
        """Every weighted loss term on one micro-batch; differentiable w.r.t. the student.

        On student samples `ce` is left out: the student's own tokens are no labels."""
        cfg = self.cfg
        ids = batch.ids
        t_wanted = {t for _, t in self.pairs}
        s_wanted = {s for s, _ in self.pairs}
        t_logits, t_states, aligned = self._teacher_logits(batch, t_wanted)
        with capture_blocks(self.s_layers, s_wanted) as s_states, self._autocast():
            s_out = self.model(input_ids=ids, use_cache=False, logits_to_keep=0 if self.needs_logits else 1)
        pred, target = batch.masks()
        terms: dict[str, torch.Tensor] = {}
        for name in self.weights:
            if name == "kl":
                terms[name] = L.kl(s_out.logits, t_logits, temperature=cfg.temperature, top_k=cfg.top_k, mask=pred)
            elif name == "rkl":
                terms[name] = L.rkl(s_out.logits, t_logits, temperature=cfg.temperature, top_k=cfg.top_k,
                                    mask=pred)
            elif name == "jsd":
                terms[name] = L.jsd(s_out.logits, t_logits, beta=cfg.jsd_beta, temperature=cfg.temperature,
                                    top_k=cfg.top_k, mask=pred)
            elif name == "uld":
                terms[name] = self._uld(s_out.logits, t_logits, aligned, pred)
            elif name == "ce":
                if batch.source != "student":
                    terms[name] = L.ce(s_out.logits, ids, mask=target)
            else:
                terms[name] = L.hidden_loss(name, s_states, t_states, self.pairs, projection=self.projection,
                                            mask=pred)
        return terms

    def _uld(self, s_logits: torch.Tensor, t_logits: torch.Tensor, aligned, pred) -> torch.Tensor:
        """ULD on the aligned positions (all positions when the vocabularies agree: then no re-tokenizing)."""
        if aligned is None:
            keep = pred if pred is not None else torch.ones(s_logits.shape[:2], dtype=torch.bool,
                                                             device=s_logits.device)
            return L.uld(s_logits[keep], t_logits[keep], temperature=self.cfg.temperature, top_k=self.cfg.top_k)
        dev = s_logits.device
        s_rows = s_logits[aligned.rows.to(dev), aligned.student_pos.to(dev)]  # (N, V_s)
        t_rows = t_logits[aligned.rows.to(dev), aligned.teacher_pos.to(dev)]  # (N, V_t)
        return L.uld(s_rows, t_rows, temperature=self.cfg.temperature, top_k=self.cfg.top_k)

    def step(self, step: int) -> StepResult:
        """Run optimizer step `step` (0-based) and return its logged values (averaged over ranks)."""
        lr = lr_at(self.cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self.micro_batches(step)
        # every micro-batch of a step has the same source, hence the same terms (ce is absent on student samples)
        sums: dict[str, torch.Tensor] = {}
        for m, batch in enumerate(batches):
            last = m == len(batches) - 1
            # DDP: average gradients only once per optimizer step, on the last micro-batch
            # (FSDP reduce-scatters every micro-batch: its gradients stay sharded, the point of FSDP)
            sync = contextlib.nullcontext() if last or not self.ddp else self.model.no_sync()
            with sync:
                terms = self.loss_terms(batch)
                total = L.weighted_total(terms, self.weights) / len(batches)
                total.backward()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach() / len(batches)
        logged = {name: float(self.world.mean(v)) for name, v in sums.items()}  # the same on every rank
        _check_finite(step, logged)  # before the optimizer: a NaN step must not reach the weights
        if self.world.distributed and self.projection is not None:
            import torch.distributed as dist

            for p in self.projection.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    p.grad /= self.world.size
        grad_norm = None
        if self.cfg.max_grad_norm is not None:
            if self.sharded:
                from surgery.distill.fsdp import clip_grad_norm

                grad_norm = clip_grad_norm(self.params, self.cfg.max_grad_norm)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
            _check_finite(step, {"gradient norm": grad_norm})
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # finite grads can still push a weight past float range (an absurd lr): one fused pass, before this step's
        # weights can reach a checkpoint or the output
        _check_finite(step, {"weight norm": self._weight_norm()})
        logged["total"] = sum(self.weights[n] * v for n, v in logged.items())
        return StepResult(logged, lr, grad_norm, self.cfg.batch_size * self.cfg.seq_len, batches[0].source)

    def _weight_norm(self) -> float:
        if self.sharded:
            from surgery.distill.fsdp import global_norm

            return float(global_norm(list(self.params)))
        return float(torch.nn.utils.get_total_norm(list(self.params)))

    # ------------------------------------------------------------------ evaluation

    @property
    def evaluates_here(self) -> bool:
        """Whether this rank runs `evaluate`: rank 0 alone, except under FSDP, where every rank must take part in
        each forward (its all-gathers); all then compute the same numbers and rank 0 logs them."""
        return self.world.is_main or self.sharded

    def evaluate(self) -> dict | None:
        """Student perplexity on the eval blocks (surgery.metrics.perplexity), or None without eval data."""
        if self.prep.eval is None:
            return None
        from surgery.metrics.perplexity import perplexity

        if self.sharded:  # the function without its inference_mode decorator (see _frozen)
            perplexity = perplexity.__wrapped__
        self.student.eval()
        try:
            with self._autocast(), self._frozen():
                result = perplexity(self.student, self.prep.eval, batch_size=self.micro)
        finally:
            self.student.train()
        return {"perplexity": result.perplexity, "nll_per_token": result.nll_per_token, "targets": result.targets,
                "data_fingerprint": self.prep.eval.fingerprint}

    # ------------------------------------------------------------------ state for checkpoints

    def state(self, next_step: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything that changes during training: (tensors for safetensors, JSON-able metadata).

        Under FSDP the tensors are {}: every rank writes its shards with `write_shards` instead."""
        if self.sharded:
            return {}, {"step": next_step, "samples_seen": next_step * self.cfg.batch_size,
                        "data_fingerprint": self.prep.train.fingerprint, "world_size": self.world.size,
                        "sharded": "fsdp"}
        tensors: dict[str, torch.Tensor] = {}
        for name, p in self.student.named_parameters():
            tensors[f"student.{name}"] = p.detach()
        if self.projection is not None:
            for name, p in self.projection.named_parameters():
                tensors[f"projection.{name}"] = p.detach()
        opt = self.optimizer.state_dict()
        scalars: dict[str, object] = {}
        for idx, entry in opt["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{idx}.{key}"] = value
                else:
                    scalars[f"{idx}.{key}"] = value
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.world.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.world.device)
        py_version, py_state, py_gauss = random.getstate()
        meta = {
            "step": next_step,
            "samples_seen": next_step * self.cfg.batch_size,
            "data_fingerprint": self.prep.train.fingerprint,
            "optimizer_groups": [{k: v for k, v in g.items()} for g in opt["param_groups"]],
            "optimizer_scalars": scalars,
            "python_random": [py_version, list(py_state), py_gauss],
            "world_size": self.world.size,
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> int:
        """Restore a `state()`; returns the step to run next.

        Raises:
            UserError: The checkpoint was made on other data or does not fit the student.
        """
        if meta["data_fingerprint"] != self.prep.train.fingerprint:
            raise UserError("the training data changed since the checkpoint was written (token fingerprints "
                            "differ): restore the data or start a new job")
        from surgery.distill.world import check_resume_world_size

        check_resume_world_size(int(meta.get("world_size", 1)), self.world.size, bool(meta.get("sharded")))
        if bool(meta.get("sharded")) != self.sharded:
            raise UserError("the checkpoint was written " + ("with" if meta.get("sharded") else "without")
                            + " fsdp and this job runs " + ("with" if self.sharded else "without") + " it: "
                            "restore the job file's fsdp setting")
        if self.sharded:
            from surgery.distill.fsdp import read_shards

            read_shards(Path(meta["path"]), self.checkpoint_modules(), self.optimizer, self.world)
            return int(meta["step"])
        named = dict(self.student.named_parameters())
        if self.projection is not None:
            named.update({f"projection.{k}": v for k, v in self.projection.named_parameters()})
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith(("student.", "projection.")):
                    name = key.removeprefix("student.") if key.startswith("student.") else key
                    if name not in named or named[name].shape != value.shape:
                        raise UserError(f"checkpoint tensor {key} does not fit this student: start a new job")
                    named[name].copy_(value)
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for key, value in meta["optimizer_scalars"].items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        groups = []
        for g in meta["optimizer_groups"]:
            g = dict(g)
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
            groups.append(g)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.world.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.world.device)
        v, st, gauss = meta["python_random"]
        random.setstate((v, tuple(st), gauss))
        return int(meta["step"])


    # ------------------------------------------------------------------ sharded checkpoints and the output

    def checkpoint_modules(self) -> nn.Module:
        """The trained modules under the names their checkpoint tensors get (student.*, projection.*)."""
        modules = {"student": self.student}
        if self.projection is not None:
            modules["projection"] = self.projection
        return nn.ModuleDict(modules)

    def write_shards(self, tmp: Path) -> None:
        """FSDP: write this rank's shards and RNG states into the checkpoint directory `tmp` (every rank calls it)."""
        from surgery.distill.fsdp import write_shards

        write_shards(tmp, self.checkpoint_modules(), self.optimizer, self.world)

    def save_output(self, out: Path, *, tokenizer, manifest: dict | None, overwrite: bool) -> None:
        """Save the trained student as an ordinary model directory from rank 0. Under FSDP every rank calls this:
        the full state dict is gathered to rank 0's CPU first."""
        from surgery.export import save_model_dir

        if not self.sharded:
            if self.world.is_main:
                save_model_dir(self.student, out, tokenizer=tokenizer, manifest=manifest, overwrite=overwrite)
            return
        from surgery.distill import fsdp

        full = fsdp.full_state_dict(self.student)
        if not self.world.is_main:
            return

        def write(tmp: Path) -> None:
            with fsdp.unsharded_class(self.student, self.student_class):
                self.student.save_pretrained(tmp, state_dict=full, max_shard_size="5GB")

        save_model_dir(self.student, out, tokenizer=tokenizer, manifest=manifest, overwrite=overwrite,
                       write_weights=write)


@dataclass
class LoopHooks:
    """Callbacks the job runner gives the loop (all optional).

    Attributes:
        should_stop: asked before each step; True stops the loop (cancel request, SIGTERM).
        on_step: called after each step with (step, StepResult, seconds the step took).
        after_step: called with the number of finished steps (checkpoints, periodic eval).
    """

    should_stop: Callable[[], bool] | None = None
    on_step: Callable[[int, StepResult, float], None] | None = None
    after_step: Callable[[int], None] | None = None


def train(trainer: Trainer, start_step: int, hooks: LoopHooks | None = None) -> int:
    """Run steps start_step .. cfg.steps - 1; returns the number of finished steps (< steps when stopped)."""
    import time

    hooks = hooks or LoopHooks()
    for step in range(start_step, trainer.cfg.steps):
        if hooks.should_stop is not None and trainer.world.any(hooks.should_stop()):
            return step
        t0 = time.perf_counter()
        result = trainer.step(step)
        if hooks.on_step is not None:
            hooks.on_step(step, result, time.perf_counter() - t0)
        if hooks.after_step is not None:
            hooks.after_step(step + 1)
    return trainer.cfg.steps
