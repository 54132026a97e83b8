"""Metric records: versioned JSON files, one per (kind of metric, model, data, settings), reused instead of recomputed.

A record holds every number of one kind ("size", "perplexity", "agreement", "speed", "generation", "lm_eval",
"rec") for one model, with what it was measured on and how: model fingerprint (sha256 of the weights), data (the
token blocks' fingerprint, or the prepared rec data's), teacher, device, hardware, dtype, settings, library
versions.

Its `key` is the sha256 of exactly the fields that change the numbers (see `record_key`); a later eval or compare
that computes the same key finds the file `<kind>-<key>.json` in the records directory and reuses it. Batch size,
run time and versions are recorded (`run`, `versions`) but not keyed.

The directory is `--records DIR`, else `$WORKBENCH_RECORDS`, else `evals/` under the platform's user data
directory for "workbench" (a session points it at its own evals/).
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from surgery.cache import atomic_write_text
from surgery.errors import UserError

RECORD_VERSION = 1
Kind = Literal["size", "perplexity", "agreement", "speed", "generation", "lm_eval", "rec"]
# display order: recommendation metrics right under size, as the rec reports read
KINDS: tuple[str, ...] = ("size", "rec", "perplexity", "agreement", "speed", "lm_eval", "generation")
DATA_KINDS = frozenset({"perplexity", "agreement", "rec"})  # numbers that depend on the data (tokens, rec split)
Scalar = str | int | float | bool | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    """A model as the user named it, and the fingerprint of its weights."""

    source: str
    fingerprint: str


class DataRef(_Strict):
    """The token blocks a metric was measured on (see surgery.data)."""

    source: str
    fingerprint: str = Field(description="sha256 of the kept token ids")
    seq_len: int
    blocks: int
    tokens: int


class RecDataRef(_Strict):
    """The prepared recommendation data a "rec" record was measured on (see surgery.rec.data)."""

    source: str
    fingerprint: str = Field(description="the prepared split's fingerprint (sequences + parameters)")
    users: int
    items: int
    interactions: int


NOISY = 0.15  # spread / value above which a timing is too unsteady to stand for the model


class Metric(_Strict):
    """One number (or text) of a record.

    `better` says which direction is an improvement ("lower" / "higher"; None: neither). Timed metrics carry the
    spread ((max - min) / 2) and their samples; lm-eval scores carry their stderr as `spread`.
    """

    name: str
    value: int | float | str | None
    unit: str = ""
    better: Literal["lower", "higher"] | None = None
    spread: float | None = None
    samples: list[float] | None = None
    note: str | None = None

    def is_noisy(self) -> bool:
        """A timed number whose spread is over NOISY of its value (a busy machine): shown marked, never reused."""
        if self.spread is None or isinstance(self.value, (str, bool)) or not self.value:
            return False
        return self.spread / abs(float(self.value)) > NOISY


class EvalRecord(_Strict):
    """Every metric of one kind for one model, with its provenance."""

    version: Literal[1] = RECORD_VERSION
    kind: Kind
    key: str
    model: ModelRef
    data: DataRef | RecDataRef | None = None
    teacher: ModelRef | None = None
    device: str | None = None
    hardware: str | None = None
    dtype: str | None = None
    settings: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict)
    run: dict[str, Scalar] = Field(default_factory=dict, description="recorded, not keyed: batch size, seconds")
    versions: dict[str, str] = Field(default_factory=dict)
    created: str = ""
    metrics: list[Metric]

    def metric(self, name: str) -> Metric | None:
        """The metric called `name`, if the record has it."""
        return next((m for m in self.metrics if m.name == name), None)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, two-space indent, trailing newline."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def record_key(
    kind: str,
    model_fingerprint: str,
    *,
    data_fingerprint: str | None = None,
    teacher_fingerprint: str | None = None,
    device: str | None = None,
    hardware: str | None = None,
    dtype: str | None = None,
    settings: dict | None = None,
) -> str:
    """The key of a record: sha256 over the canonical JSON of the fields that change its numbers."""
    doc = {
        "version": RECORD_VERSION,
        "kind": kind,
        "model": model_fingerprint,
        "data": data_fingerprint,
        "teacher": teacher_fingerprint,
        "device": device,
        "hardware": hardware,
        "dtype": dtype,
        "settings": settings or {},
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def default_records_dir() -> Path:
    """$WORKBENCH_RECORDS, else <user data dir>/workbench/evals."""
    env = os.environ.get("WORKBENCH_RECORDS")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("workbench")) / "evals"


class RecordStore:
    """A directory of records, one JSON file per key (written atomically; damaged files read as missing)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_records_dir()

    def check_writable(self) -> None:
        """Create the directory if needed and make sure records can be written there.

        Raises:
            UserError: The directory cannot be created or written (checked before any work starts).
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the records directory {self.root} ({exc.strerror}): "
                            "choose another with --records DIR") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise UserError(f"the records directory {self.root} is not writable: choose another with --records DIR")

    def path_for(self, kind: str, key: str) -> Path:
        """Where the record of `kind` with `key` lives."""
        return self.root / f"{kind}-{key.removeprefix('sha256:')[:32]}.json"

    def get(self, kind: str, key: str) -> EvalRecord | None:
        """The stored record with this key, or None (missing, unreadable, other version, other key)."""
        record = _read(self.path_for(kind, key))
        return record if record is not None and record.key == key and record.kind == kind else None

    def put(self, record: EvalRecord) -> Path:
        """Store `record` (replacing one with the same key) and return its path."""
        path = self.path_for(record.kind, record.key)
        atomic_write_text(path, record.to_json())
        return path

    def all(self) -> list[EvalRecord]:
        """Every readable record in the directory, oldest first."""
        if not self.root.is_dir():
            return []
        records = [r for p in sorted(self.root.glob("*.json")) if (r := _read(p)) is not None]
        return sorted(records, key=lambda r: r.created)


def _read(path: Path) -> EvalRecord | None:
    try:
        return EvalRecord.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, ValidationError):
        return None  # a missing or damaged record is only a cache miss: it is recomputed
