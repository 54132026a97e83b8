"""The distillation job file: a versioned pydantic model (`extra="forbid"`, JSON with sorted keys).

A job file says everything a run needs, so a job can be restarted, resumed or replayed on another box from it
alone. Unknown fields are errors; a file written by a newer workbench is refused with a line saying so.

    {"version": 1, "kind": "distill", "teacher": "smollm2-135m", "student": "./smol-80",
     "data": "../shared/data/tinyshakespeare/input.txt", "losses": {"kl": 1.0, "ce": 0.1, "hidden-cos": 0.5},
     "temperature": 2.0, "steps": 300, "seq_len": 256, "batch_size": 4, "lr": 0.0002, ...}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import math

from surgery.distill.losses import CROSS_VOCAB_LOSSES, HIDDEN_LOSSES, LOGIT_LOSSES, LOSS_NAMES
from surgery.errors import UserError

JOB_VERSION = 1


class DistillConfig(BaseModel):
    """One distillation (or redistillation) job (job file version 1)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    version: int = JOB_VERSION
    kind: Literal["distill"] = "distill"
    teacher: str = Field(min_length=1, description="teacher model source (frozen, runs in inference mode)")
    student: str = Field(min_length=1, description="student model source (trained)")
    data: str = Field(min_length=1, description="training text (surgery.data contract), tokenized by the student")
    text_field: str | None = None
    max_tokens: int | None = Field(default=None, ge=2, description="use at most this many training tokens")
    shuffle: bool = Field(default=True, description="shuffle the blocks each epoch with the job seed")
    eval_data: str | None = Field(default=None, description="text for perplexity before, during and after")
    eval_tokens: int | None = Field(default=None, ge=2, description="evaluate on at most this many tokens")
    eval_every: int | None = Field(default=None, ge=1, description="also evaluate every N steps")
    eval_seq_len: int | None = Field(default=None, ge=2, description="eval block length (default: seq_len)")

    losses: dict[str, float] = Field(default_factory=lambda: {"kl": 1.0}, description="loss name -> weight")
    temperature: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=1, description="truncate teacher logits to their top k")
    jsd_beta: float = Field(default=0.5, ge=0, le=1, description="jsd: 0 = forward KL, 1 = reverse KL (GKD)")
    on_policy: float = Field(default=0.0, ge=0, le=1, description="fraction lambda of steps on student samples")
    seq_kd: bool = Field(default=False, description="other steps train on the teacher's own samples")
    gen_tokens: int = Field(default=64, ge=1, description="tokens sampled after each block's prompt (on-policy, "
                                                         "seq-kd); the prompt is the block's first seq_len - N")
    teacher_cache: str | None = Field(default=None, description="directory of cached teacher top-k log-probs")
    hidden_layers: dict[int, int] | None = Field(
        default=None, description="student block -> teacher block for hidden losses (default: evenly spaced)"
    )
    projection: bool | None = Field(
        default=None, description="learned linear map student -> teacher width (default: only when widths differ)"
    )

    steps: int = Field(ge=1)
    seq_len: int = Field(default=256, ge=2)
    batch_size: int = Field(default=4, ge=1, description="sequences per optimizer step, all processes together")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(default=2e-4, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["constant", "linear", "cosine", "wsd"] = "constant"
    max_grad_norm: float | None = Field(default=1.0, gt=0, allow_inf_nan=False)
    seed: int = 0

    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=1, ge=1)

    device: str = Field(default="auto", description="auto (cuda when available), cpu, cuda, cuda:N")
    dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="dtype of the trained weights")
    autocast: bool = Field(default=True, description="bf16 autocast on GPU (ignored on CPU)")
    deterministic: bool = Field(default=True, description="deterministic algorithms (exact resume on CPU)")
    fsdp: bool = Field(default=False, description="FSDP2 instead of DDP under torchrun (student and teacher "
                                                  "sharded; without torchrun a 1-rank FSDP run)")

    out: str | None = Field(default=None, description="final model directory (default: <job dir>/output)")
    overwrite: bool = False

    @field_validator("losses")
    @classmethod
    def _check_losses(cls, losses: dict[str, float]) -> dict[str, float]:
        if not losses:
            raise ValueError("no loss terms: name at least one of " + ", ".join(LOSS_NAMES))
        for name, weight in losses.items():
            if name not in LOSS_NAMES:
                raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSS_NAMES)}")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"loss weight for {name} must be a finite number >= 0 (got {weight})")
        if not any(w > 0 for w in losses.values()):
            raise ValueError("every loss weight is 0: nothing to train on")
        return losses

    @model_validator(mode="after")
    def _check_batch(self) -> DistillConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        return self

    @model_validator(mode="after")
    def _check_recipe(self) -> DistillConfig:
        sampled = self.on_policy > 0 or self.seq_kd
        if sampled and self.gen_tokens >= self.seq_len:
            raise ValueError(f"gen_tokens {self.gen_tokens} must be smaller than seq_len {self.seq_len} (the rest of "
                             "each block is the prompt)")
        if self.on_policy > 0 and not (self.logit_losses or self.hidden_losses):
            raise ValueError("on_policy needs a teacher loss (kl, rkl, jsd or a hidden loss): ce cannot score the "
                             "student's own samples")
        if self.teacher_cache is not None:
            if self.top_k is None:
                raise ValueError("teacher_cache stores the teacher's top k log-probabilities: set top_k "
                                 "(--top-k K, e.g. 64)")
            clash = [n for n, on in (("on_policy", self.on_policy > 0), ("seq_kd", self.seq_kd),
                                     ("hidden losses", bool(self.hidden_losses)),
                                     ("uld", "uld" in self.losses)) if on]
            if clash:
                raise ValueError(f"teacher_cache holds logits of the training blocks only; {', '.join(clash)} "
                                 "need a live teacher")
        if "uld" in self.losses and self.losses["uld"] > 0 and sampled:
            raise ValueError("uld with on_policy / seq_kd is not supported (samples are not re-tokenized for the "
                             "teacher)")
        return self

    @property
    def logit_losses(self) -> list[str]:
        return [n for n in self.losses if n in LOGIT_LOSSES and self.losses[n] > 0]

    @property
    def cross_vocab_losses(self) -> list[str]:
        return [n for n in self.losses if n in CROSS_VOCAB_LOSSES and self.losses[n] > 0]

    @property
    def hidden_losses(self) -> list[str]:
        return [n for n in self.losses if n in HIDDEN_LOSSES and self.losses[n] > 0]

    def with_paths_from(self, base: str | Path) -> DistillConfig:
        """A copy whose relative local paths (models, data, out) are made absolute against `base`.

        Aliases and hub ids ("smollm2-135m", "org/name") are left alone: only names that exist under `base` or
        that start with "." are treated as paths. A job process may run in another directory than its creator.
        """
        base = Path(base)

        def fix(value: str | None) -> str | None:
            if value is None or value.startswith("hf:") or Path(value).expanduser().is_absolute():
                return value
            candidate = base / value
            return str(candidate.resolve()) if candidate.exists() or value.startswith(".") else value

        return self.model_copy(update={k: fix(getattr(self, k)) for k in ("teacher", "student", "data", "eval_data",
                                                                          "out", "teacher_cache")})

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, trailing newline)."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def parse_losses(text: str) -> dict[str, float]:
    """"kl:1.0,ce:0.1,hidden-cos:0.5" -> {"kl": 1.0, "ce": 0.1, "hidden-cos": 0.5}; a bare name weighs 1.0.

    Raises:
        UserError: An unknown loss name or a weight that is not a number.
    """
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip().lower().replace("_", "-")
        if name not in LOSS_NAMES:
            raise UserError(f"unknown loss {name!r} in --loss; known: {', '.join(LOSS_NAMES)}")
        if name in out:  # kl:1,kl:2 would silently become kl:2
            raise UserError(f"--loss names {name} twice: give each loss once")
        try:
            out[name] = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise UserError(f"--loss {part!r}: the weight after ':' must be a number") from None
        if not math.isfinite(out[name]) or out[name] < 0:
            raise UserError(f"--loss {part!r}: the weight must be a finite number >= 0")
    if not out:
        raise UserError("--loss names no loss (e.g. --loss kl:1.0,ce:0.1)")
    return out


def parse_layer_map(text: str) -> dict[int, int]:
    """"0:1,1:3,2:5" (student:teacher block pairs) -> {0: 1, 1: 3, 2: 5}.

    Raises:
        UserError: A pair that is not two integers.
    """
    out: dict[int, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        s, sep, t = part.partition(":")
        if not sep or not s.strip().isdigit() or not t.strip().isdigit():
            raise UserError(f"--hidden-layers {part!r}: expected STUDENT:TEACHER block indices, e.g. 0:1,1:3")
        out[int(s)] = int(t)
    return out


def _problem(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown field"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg  # a cross-field check: the caller already names the file


def parse_config(data: Any, where: str = "job file") -> DistillConfig:
    """Validate a decoded job file.

    Raises:
        UserError: A newer version, a missing or unknown field, a bad value (every problem on one line).
    """
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{where}: missing or non-integer 'version' (this workbench writes version {JOB_VERSION})")
    if version > JOB_VERSION:
        raise UserError(f"{where} is version {version}, newer than this workbench reads (version {JOB_VERSION}): "
                        "upgrade the workbench")
    if version < 1:
        raise UserError(f"{where}: unsupported version {version}")
    try:
        return DistillConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(e) for e in exc.errors()]
        raise UserError(f"{where}: " + "; ".join(problems)) from None


def load_config(path: str | Path) -> DistillConfig:
    """Read and validate a job file.

    Raises:
        UserError: Missing file, malformed JSON, or an invalid job (see `parse_config`).
    """
    from surgery.plan import read_json_file

    path = Path(path)
    return parse_config(read_json_file(path, "job"), str(path))
