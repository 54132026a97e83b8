"""The plan file: a versioned, validated list of structural ops, replayable anywhere.

Every index names a component of the ORIGINAL model the plan was made for (layer 12 stays layer 12 even when layer
3 is dropped), so steps may come in any order. Unknown fields are errors, not silent defaults.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, ValidationError, WrapValidator, model_validator

from surgery.errors import PlanError, UserError
from surgery.filemode import ordinary_mode
from surgery.indices import Indices, compact_plan_lists, restore_lists

PLAN_VERSION = 1

# strict: the schema says integer, so "0" and true (which pydantic would turn into 0 and 1) are refused
NonNegInt = Annotated[int, Field(ge=0, strict=True)]


def _packed(value: Any, check: Callable[[Any], list[int]]) -> Indices | list[int]:
    # Indices were checked when they were made (surgery.indices.as_indices); anything else goes through the list
    # schema, so its errors read as they always did, then is packed. An index past int64 stays a list: no model
    # has that many of anything, and the resolver names it out of range as before.
    if isinstance(value, Indices):
        return value
    checked = check(value)
    try:
        return Indices(checked)
    except OverflowError:
        return checked


# held as Indices (int64, 8 bytes an index instead of ~40), written as a JSON list
IndexList = Annotated[list[NonNegInt], Field(min_length=1), WrapValidator(_packed),
                      PlainSerializer(list, return_type=list[int])]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    """The model a plan was made for."""

    source: str = Field(description="what the user opened: a directory, a hub id, a .gguf file or an alias")
    fingerprint: str | None = Field(
        default=None, description="sha256 of the weights ('sha256:<hex>'); apply refuses other weights"
    )


class PruneHeads(_Strict):
    """Remove query heads of one layer (GQA rule: kept KV groups keep equal numbers of query heads)."""

    op: Literal["prune_heads"]
    layer: NonNegInt
    heads: IndexList


class PruneKVGroups(_Strict):
    """Remove whole KV groups of one layer: their key/value heads and all their query heads."""

    op: Literal["prune_kv_groups"]
    layer: NonNegInt
    groups: IndexList


class PruneNeurons(_Strict):
    """Remove MLP neurons of one layer (rows of gate/up, columns of down)."""

    op: Literal["prune_neurons"]
    layer: NonNegInt
    neurons: IndexList


class DropLayers(_Strict):
    """Remove whole decoder layers."""

    op: Literal["drop_layers"]
    layers: IndexList


class DropAttention(_Strict):
    """Remove the attention sub-block of one layer."""

    op: Literal["drop_attention"]
    layer: NonNegInt


class DropMLP(_Strict):
    """Remove the MLP sub-block of one layer."""

    op: Literal["drop_mlp"]
    layer: NonNegInt


class PruneHidden(_Strict):
    """Remove residual-stream channels everywhere they appear (Minitron width pruning).

    Embedding columns, every hidden-size norm weight, the input columns of q/k/v/gate/up, the output rows of o/down
    and the lm_head columns (a tied embedding once). The norms then normalise over the kept channels.
    """

    op: Literal["prune_hidden"]
    channels: IndexList = Field(description="original residual-stream channel indices to remove")
    rescale_norms: bool = Field(
        default=True,
        description="multiply every hidden-size RMSNorm weight by sqrt(hidden / kept): exact when the removed "
        "channels are zero, and close when they carry little energy (the ones norm-magnitude scores remove)",
    )


class PruneExperts(_Strict):
    """Remove experts of one mixture-of-experts layer: their weights and their router rows."""

    op: Literal["prune_experts"]
    layer: NonNegInt
    experts: IndexList


# low_rank methods computed from the plan's calibration activations (surgery.reconstruct), not from W alone
DATA_RANK_METHODS = ("whitened", "asvd")
ASVD_ALPHA = 0.5  # ASVD's default exponent on the per-channel mean |x| (Yuan et al. 2023)


class LowRank(_Strict):
    """Replace one Linear by two from its truncated SVD at `rank`."""

    op: Literal["low_rank"]
    module: str = Field(min_length=1, description="HF module path, e.g. model.layers.5.mlp.down_proj")
    rank: Annotated[int, Field(ge=1, strict=True)]
    method: Literal["svd", "whitened", "asvd"] | None = Field(
        default=None,
        description="svd (default): truncated SVD of W. whitened: SVD of W S, S the Cholesky factor of the input "
        "Gram matrix on the plan's calibration text (SVD-LLM). asvd: SVD of W diag(s)^alpha, s the per-input-channel "
        "mean |x| on the calibration text, the scaling undone on the right factor (ASVD). whitened and asvd need the "
        "plan's `calibration` block",
    )
    alpha: Annotated[float, Field(gt=0, le=4)] | None = Field(
        default=None, description=f"asvd only: the exponent on the mean |x| (default {ASVD_ALPHA})"
    )

    @model_validator(mode="after")
    def _alpha_needs_asvd(self):
        if self.alpha is not None and self.method != "asvd":
            raise ValueError("alpha is only used by method asvd")
        return self


class Reconstruct(_Strict):
    """Refit the projections that read cut activations (o_proj after heads, down_proj after neurons).

    Closed-form ridge least squares, layer by layer, on the plan's calibration text: the refit layer's output
    stays as close as possible to the original model's (surgery.reconstruct).
    """

    op: Literal["reconstruct"]
    inputs: Literal["pruned", "original"] = Field(
        default="original",
        description="where each layer's inputs come from: the original model (default: measured better on the demo "
        "at 4k calibration tokens, docs/benchmarks.md), or the already-pruned (and refit) prefix; the target is "
        "always the original model's output",
    )
    ridge: Annotated[float, Field(ge=0)] = Field(
        default=0.1, description="ridge term toward the plain cut's weights, relative to the mean diagonal of each "
        "input Gram matrix (0.1: measured on the demo, docs/benchmarks.md)"
    )
    layers: IndexList | None = Field(default=None, description="original layers to refit (default: every cut one)")


class Calibration(_Strict):
    """The calibration text data-driven steps (reconstruct, whitened low_rank) are computed on (surgery.data)."""

    source: str = Field(min_length=1, description="data file (.txt, .jsonl, .parquet) or hf:NAME[:CONFIG[:SPLIT]]")
    fingerprint: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="sha256 of the kept token ids; apply "
                             "refuses data whose tokens differ")
    tokens: Annotated[int, Field(ge=2)] = Field(description="tokens kept: the first tokens // seq_len blocks")
    seq_len: Annotated[int, Field(ge=2)]
    batch_size: Annotated[int, Field(ge=1)] = 8
    text_field: str | None = None


Step = Annotated[
    Union[PruneHeads, PruneKVGroups, PruneNeurons, DropLayers, DropAttention, DropMLP, LowRank, Reconstruct,
          PruneHidden, PruneExperts],
    Field(discriminator="op"),
]
OP_NAMES = ("prune_heads", "prune_kv_groups", "prune_neurons", "drop_layers", "drop_attention", "drop_mlp", "low_rank",
            "reconstruct", "prune_hidden", "prune_experts")


class Plan(_Strict):
    """A surgery plan (file format version 1)."""

    version: Literal[1] = PLAN_VERSION
    model: ModelRef | None = None
    calibration: Calibration | None = None
    steps: list[Step] = Field(default_factory=list)
    provenance: dict[str, Any] = Field(default_factory=dict, description="free-form: scores, data fingerprint, who")

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, 2-space indent, trailing newline."""
        data = self.model_dump(mode="json", exclude_none=True)
        return compact_int_lists(json.dumps(data, indent=2, sort_keys=True)) + "\n"

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file in the same directory, then rename)."""
        write_text_atomic(Path(path), self.to_json())


_INT_LIST = re.compile(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]")


def compact_int_lists(text: str) -> str:
    """Put lists of integers on one line: a plan with 30 x 1000 neuron indices stays readable and diffable."""
    return _INT_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def _loc(loc: tuple) -> str:
    """pydantic error location -> `steps[3].heads` (dropping the union tag pydantic inserts)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in OP_NAMES:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "plan"


def _message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "union_tag_invalid":
        return f"unknown op {err['input'].get('op')!r}; expected one of: {', '.join(OP_NAMES)}"
    if err["type"] == "union_tag_not_found":
        return "missing 'op'"
    if err["type"] == "literal_error" and err["loc"] == ("version",):
        return f"unsupported plan version {err['input']!r}; this workbench reads version {PLAN_VERSION}"
    return err["msg"]


def parse_plan(data: Any) -> Plan:
    """Validate a decoded JSON document; raises PlanError listing every problem."""
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError([f"{_loc(e['loc'])}: {_message(e)}" for e in exc.errors()]) from None


def read_json_file(path: Path, what: str, *, malformed: Callable[[str], Exception] = UserError) -> Any:
    """The decoded JSON of the `what` file at `path` (plan, job ...), read once; one-line errors that name the spot
    (devices, FIFOs without a writer, huge or deeply nested files included: see surgery.jsonfile).

    Raises:
        UserError: Missing, unreadable or not a file, too large.
        `malformed(message)`: The text is not JSON (line and column in the message), or nests too deeply.
    """
    from surgery.jsonfile import read_json_file as read_checked

    return read_checked(path, what, malformed=malformed)


def read_plan_json(path: str | Path) -> Any:
    """The decoded JSON of a plan file (read once: it may be a pipe); PlanError for text that is not JSON. Each
    step's index list is packed into Indices as it is decoded (surgery.indices: a 70B plan's lists stay a few MB)."""
    from surgery.jsonfile import read_json_file as read_checked

    data = read_checked(Path(path), "plan", malformed=lambda message: PlanError([message]),
                        object_pairs_hook=compact_plan_lists)
    return restore_lists(data)


def load_plan(path: str | Path, data: Any = None) -> Plan:
    """Read and validate a plan file (or its already decoded JSON `data`); bad JSON or fields give a PlanError
    whose message names the spot."""
    path = Path(path)
    if data is None:
        data = read_plan_json(path)
    try:
        return parse_plan(data)
    except PlanError as exc:
        raise PlanError([f"{path}: {p}" for p in exc.problems]) from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same directory and os.replace (no torn files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, ordinary_mode())  # mkstemp makes it 0600; a plan or manifest is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plan_json_schema() -> dict:
    """The JSON Schema of the plan file (published in docs/plan.schema.json)."""
    return Plan.model_json_schema()
