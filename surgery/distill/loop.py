"""The distillation step and loop.

One optimizer step: the global batch of `batch_size` blocks is cut into `grad_accum` x `world.size` micro-batches;
for each, the teacher runs in `torch.inference_mode()` (no autograd state kept), the student in train mode, both
under bf16 autocast on GPU; every loss term is computed in float32, weighted, and back-propagated; gradients are
averaged over ranks by DDP; then clipping and one AdamW step. Each term is returned separately for the event log.

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
    """Learning rate of (0-based) `step`: linear warmup, then constant, linear decay or cosine decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
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


class Trainer:
    """Student, teacher, optimizer and data of one run; `step(n)` runs optimizer step n."""

    def __init__(self, cfg: DistillConfig, prep: Prepared, world: World):
        from surgery.arch import spec_for_config
        from surgery.ops import get_module

        self.cfg, self.prep, self.world = cfg, prep, world
        self.student, self.teacher, self.projection = prep.student, prep.teacher, prep.projection
        micro_total = cfg.grad_accum * world.size
        if cfg.batch_size % micro_total:
            raise UserError(f"batch_size {cfg.batch_size} must be a multiple of grad_accum x processes "
                            f"({cfg.grad_accum} x {world.size})")
        if cfg.fsdp:
            raise UserError("--fsdp is not supported yet: run without it (DDP replicates the student on each rank)")
        self.micro = cfg.batch_size // micro_total
        self.weights = {n: w for n, w in cfg.losses.items() if w > 0}
        self.pairs = prep.check.pairs if cfg.hidden_losses else []
        self.s_layers = get_module(self.student, spec_for_config(self.student.config).layers)
        self.t_layers = get_module(self.teacher, spec_for_config(self.teacher.config).layers)
        self.needs_logits = bool(cfg.logit_losses) or self.weights.get("ce", 0) > 0
        self.model: nn.Module = self.student
        if world.distributed:
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

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        """This rank's micro-batches of `step`: grad_accum tensors (micro, seq_len) of token ids."""
        idx = sample_indices(self.prep.train.num_blocks, self.cfg.batch_size, step, self.cfg.seed, self.cfg.shuffle)
        out = []
        for m in range(self.cfg.grad_accum):
            start = (m * self.world.size + self.world.rank) * self.micro
            out.append(self.prep.train.ids[idx[start : start + self.micro]].to(self.world.device))
        return out

    def loss_terms(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every weighted loss term on one micro-batch (B, S) of ids; differentiable w.r.t. the student."""
        cfg = self.cfg
        t_wanted = {t for _, t in self.pairs}
        s_wanted = {s for s, _ in self.pairs}
        need_t_logits = bool(cfg.logit_losses)
        with capture_blocks(self.t_layers, t_wanted) as t_states, torch.inference_mode(), self._autocast():
            t_out = self.teacher(input_ids=ids, use_cache=False, logits_to_keep=0 if need_t_logits else 1)
        # inference tensors cannot be saved for backward: the hidden states enter differentiable ops directly,
        # so they are cloned into normal tensors (the logits only enter through new tensors, no copy needed)
        t_states = {k: v.clone() for k, v in t_states.items()}
        with capture_blocks(self.s_layers, s_wanted) as s_states, self._autocast():
            s_out = self.model(input_ids=ids, use_cache=False, logits_to_keep=0 if self.needs_logits else 1)
        terms: dict[str, torch.Tensor] = {}
        for name in self.weights:
            if name == "kl":
                terms[name] = L.kl(s_out.logits, t_out.logits, temperature=cfg.temperature, top_k=cfg.top_k)
            elif name == "rkl":
                terms[name] = L.rkl(s_out.logits, t_out.logits, temperature=cfg.temperature, top_k=cfg.top_k)
            elif name == "jsd":
                terms[name] = L.jsd(s_out.logits, t_out.logits, beta=cfg.jsd_beta, temperature=cfg.temperature,
                                    top_k=cfg.top_k)
            elif name == "ce":
                terms[name] = L.ce(s_out.logits, ids)
            else:
                terms[name] = L.hidden_loss(name, s_states, t_states, self.pairs, projection=self.projection)
        return terms

    def step(self, step: int) -> StepResult:
        """Run optimizer step `step` (0-based) and return its logged values (averaged over ranks)."""
        lr = lr_at(self.cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self.micro_batches(step)
        sums = {name: torch.zeros((), device=self.world.device) for name in self.weights}
        for m, ids in enumerate(batches):
            last = m == len(batches) - 1
            # DDP: average gradients only once per optimizer step, on the last micro-batch
            sync = contextlib.nullcontext() if last or not self.world.distributed else self.model.no_sync()
            with sync:
                terms = self.loss_terms(ids)
                total = L.weighted_total(terms, self.weights) / len(batches)
                total.backward()
            for name, value in terms.items():
                sums[name] += value.detach() / len(batches)
        if self.world.distributed and self.projection is not None:
            import torch.distributed as dist

            for p in self.projection.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    p.grad /= self.world.size
        grad_norm = None
        if self.cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        logged = {name: float(self.world.mean(v)) for name, v in sums.items()}
        logged["total"] = sum(self.weights[n] * v for n, v in logged.items())
        return StepResult(logged, lr, grad_norm, self.cfg.batch_size * self.cfg.seq_len)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict | None:
        """Student perplexity on the eval blocks (surgery.metrics.perplexity), or None without eval data."""
        if self.prep.eval is None:
            return None
        from surgery.metrics.perplexity import perplexity

        self.student.eval()
        try:
            with self._autocast():
                result = perplexity(self.student, self.prep.eval, batch_size=self.micro)
        finally:
            self.student.train()
        return {"perplexity": result.perplexity, "nll_per_token": result.nll_per_token, "targets": result.targets,
                "data_fingerprint": self.prep.eval.fingerprint}

    # ------------------------------------------------------------------ state for checkpoints

    def state(self, next_step: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything that changes during training: (tensors for safetensors, JSON-able metadata)."""
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
