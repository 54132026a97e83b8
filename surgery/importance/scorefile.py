"""The score file: one safetensors file holding every score of a run, with where the scores came from.

Tensors are named `<module path>/<metric>` (`model.layers.3.self_attn/head_grad`, `model/layer_bi`,
`model.layers.3.mlp.down_proj/sv_grad`), float32. The safetensors header metadata (string -> string, readable by
any safetensors tool) holds the fields of `ScoreMeta`: method list, model and data fingerprints, token count,
seq_len, batch size, dtype, device, library versions. A score file is only used for the model and the data it
was computed on: `load_scores` compares fingerprints and refuses a mismatch unless forced.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from surgery.errors import UserError
from surgery.filemode import ordinary_mode
from surgery.importance.methods import METHODS

FORMAT = "workbench-scores"
SCORE_VERSION = 1
_METRICS = {m.metric for m in METHODS.values()}


class ScoreMismatch(UserError):
    """A score file was computed for another model or other calibration data."""


class ScoreMeta(BaseModel):
    """What a score file records about its run (file format version 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["workbench-scores"] = FORMAT
    version: Literal[1] = SCORE_VERSION
    methods: list[str]
    model_source: str
    model_fingerprint: str | None = None
    family: str | None = None
    data_source: str | None = None
    data_fingerprint: str | None = None
    tokens: int = 0
    seq_len: int | None = None
    batch_size: int | None = None
    dtype: str | None = None
    autocast: str | None = None
    device: str | None = None
    library_version: str
    versions: dict[str, str] = Field(default_factory=dict)
    seconds: float | None = None
    layerwise: bool | None = None  # True: scored one block at a time (`score --layerwise`); absent otherwise

    def to_metadata(self) -> dict[str, str]:
        """Flat string metadata for the safetensors header (lists comma-joined, dicts as sorted JSON)."""
        out: dict[str, str] = {}
        for key, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, list):
                out[key] = ",".join(value)
            elif isinstance(value, dict):
                out[key] = json.dumps(value, sort_keys=True)
            else:
                out[key] = str(value)
        return out

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str) -> ScoreMeta:
        """Parse header metadata; raises UserError naming the file and the bad field."""
        if meta.get("format") != FORMAT:
            raise UserError(f"{where} is not a workbench score file (no format={FORMAT} in its metadata)")
        data: dict = dict(meta)
        data["methods"] = [m for m in meta.get("methods", "").split(",") if m]
        if str(meta.get("version", "")).isdigit():
            data["version"] = int(meta["version"])  # Literal[1] does not coerce the header's "1"
        try:
            data["versions"] = json.loads(meta.get("versions", "{}"))
        except json.JSONDecodeError:
            raise UserError(f"{where}: metadata field 'versions' is not JSON") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            e = exc.errors()[0]
            loc = ".".join(str(p) for p in e["loc"]) or "metadata"
            raise UserError(f"{where}: bad score metadata field {loc!r} ({e['msg']})") from None


@dataclass
class ScoreFile:
    """Scores and their metadata, in memory."""

    meta: ScoreMeta
    tensors: dict[str, torch.Tensor]
    path: Path | None = None

    def metrics(self) -> set[str]:
        """Metric names present ("head_grad", ...)."""
        return {name.rpartition("/")[2] for name in self.tensors}

    def get(self, module: str, metric: str) -> torch.Tensor | None:
        """The tensor `<module>/<metric>`, or None."""
        return self.tensors.get(f"{module}/{metric}")

    def check(self, *, model_fingerprint: str | None = None, data_fingerprint: str | None = None,
              force: bool = False) -> list[str]:
        """Compare fingerprints; raise ScoreMismatch (or, when forced, return the mismatches as warnings)."""
        where = str(self.path) if self.path else "the scores"
        problems = []
        for what, mine, theirs in (("model", self.meta.model_fingerprint, model_fingerprint),
                                   ("data", self.meta.data_fingerprint, data_fingerprint)):
            if mine and theirs and mine != theirs:
                problems.append(f"{where} was computed for {what} {mine[:19]}... but this {what} is {theirs[:19]}...")
        if problems and not force:
            raise ScoreMismatch(problems[0] + " (pass --force to use it anyway)")
        return problems


def save_scores(path: str | Path, scores: ScoreFile) -> Path:
    """Write a score file atomically (temp file in the same directory, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    bad = [n for n in scores.tensors if n.rpartition("/")[2] not in _METRICS or "/" not in n]
    if bad:
        raise ValueError(f"not a `<module path>/<metric>` score name: {bad[0]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in scores.tensors.items()}
        save_file(tensors, tmp, metadata=scores.meta.to_metadata())
        os.chmod(tmp, ordinary_mode())  # mkstemp and safetensors' save_file both make it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_scores(
    path: str | Path,
    *,
    model_fingerprint: str | None = None,
    data_fingerprint: str | None = None,
    force: bool = False,
) -> ScoreFile:
    """Read a score file and check it belongs to the given model / data.

    Args:
        path: the .safetensors score file.
        model_fingerprint: "sha256:..." of the weights it will be used with (None: not checked).
        data_fingerprint: fingerprint of the calibration tokens it must have been computed on (None: not checked).
        force: return it even when a fingerprint differs.

    Raises:
        ScoreMismatch: another model or other data (unless `force`).
        UserError: missing file, not a safetensors file, not a score file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such score file: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = ScoreMeta.from_metadata(f.metadata() or {}, str(path))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged header
        raise UserError(f"cannot read score file {path} ({type(exc).__name__}: {exc})") from None
    scores = ScoreFile(meta, tensors, path)
    scores.check(model_fingerprint=model_fingerprint, data_fingerprint=data_fingerprint, force=force)
    return scores
