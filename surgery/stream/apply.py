"""Streaming apply: a structural plan written straight from slices of the input safetensors, no model in memory.

Data flow: the source's config builds the model on the meta device (no memory), the plan's cuts run on it
(shapes only) and `rewrite_config` makes its config truthful, exactly as the in-memory path does to the real
model. Its state dict names every output tensor with shape and dtype; `tensor_reads` maps each one back to a
slice of an input tensor; the writer lays them out in the files `save_pretrained` would write (same sharding,
same tensor order, same header) and hashes them as they are written. So the result is byte-identical to
load + apply + save, at about one tensor of memory.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from surgery.errors import UserError
from surgery.plan import Plan
from surgery.resolve import Resolution
from surgery.stream.reads import NotStreamable, TensorRead, tensor_reads
from surgery.stream.source import SourceTensor, tensor_locations
from surgery.stream.writer import FactorCache, HashingWriter, SliceReader, file_order, header_bytes, shard_pieces

Progress = Callable[[str], None]
STRUCTURAL_OPS = frozenset(
    {"prune_heads", "prune_kv_groups", "prune_neurons", "drop_layers", "drop_attention", "drop_mlp", "low_rank"}
)
INDEX_NAME = "model.safetensors.index.json"
_SMALL_FILES_MARGIN = 1 << 20  # config, generation config, index, manifest: well under a MiB


def plan_blockers(plan: Plan, *, pickle_weights: bool = False, trust_remote_code: bool = False) -> list[str]:
    """Why `plan` cannot stream from this source, one line each (empty: it can)."""
    reasons = []
    for i, step in enumerate(plan.steps):
        if step.op == "prune_experts":
            reasons.append(f"steps[{i}] (prune_experts): checkpoints store experts one by one and the model fuses "
                           "them, a mapping the streaming applier does not do yet, so it runs in memory")
        elif step.op == "prune_hidden":
            reasons.append(f"steps[{i}] (prune_hidden): slices every tensor of the model, which the streaming "
                           "applier does not do yet, so it runs in memory")
        elif step.op not in STRUCTURAL_OPS:
            reasons.append(f"steps[{i}] ({step.op}): needs the activations of calibration text, so the model must run")
        elif step.op == "low_rank" and getattr(step, "method", None) not in (None, "svd"):
            reasons.append(f"steps[{i}] (low_rank, method {step.method}): needs the input Gram matrix from "
                           "calibration text, so the model must run")
    if pickle_weights:
        reasons.append("the input weights are pickles, not safetensors: they cannot be read slice by slice")
    if trust_remote_code:
        reasons.append("the model runs its own code (--trust-remote-code), which save_pretrained copies with it")
    return reasons


@dataclass
class Shard:
    """One output safetensors file: its tensors in file order, and its exact size."""

    name: str
    tensors: list[TensorRead]

    @property
    def nbytes(self) -> int:
        return len(header_bytes(self.tensors)) + sum(t.nbytes for t in self.tensors)


@dataclass
class StreamPlan:
    """Everything the writer needs, known before any weight byte is read."""

    model: nn.Module  # the pruned model on the meta device, its config rewritten
    sources: dict[str, SourceTensor]
    shards: list[Shard]
    index: dict | None  # model.safetensors.index.json when sharded
    params_after: int

    @property
    def bytes_written(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def bytes_read(self) -> int:
        return sum(t.bytes_read(self.sources) for s in self.shards for t in s.tensors)

    def describe(self) -> dict:
        """The plan of reads as JSON-able data (what `workbench apply --dry-run` prints)."""
        def kept(sel, total):
            return None if sel is None else [len(sel), total]

        reads = []
        for shard in self.shards:
            for t in shard.tensors:
                src = t.factor.weight if t.factor else t
                s = self.sources.get(src.source) if src.source else None
                reads.append({
                    "name": t.name, "file": shard.name, "source": src.source,
                    "source_file": s.file.name if s else None,
                    "rows": kept(src.rows, s.shape[0]) if s and s.shape else None,
                    "cols": kept(src.cols, s.shape[1]) if s and len(s.shape) > 1 else None,
                    "low_rank": t.factor.rank if t.factor else None,
                    "bytes_read": t.bytes_read(self.sources), "bytes_written": t.nbytes,
                })  # fmt: skip
        return {
            "path": "stream",
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "params_after": self.params_after,
            "shards": [{"file": s.name, "bytes": s.nbytes, "tensors": len(s.tensors)} for s in self.shards],
            "reads": reads,
        }


def source_meta_model(path: Path, config_dict: dict, dtype: torch.dtype) -> nn.Module:
    """The model `surgery.loading.load_model` would build from `path`, on the meta device (no weights read).

    Built the same way (plain from_pretrained-style config and generation config, or the surgery loader's
    reshaping for `surgery_layers` checkpoints), because config.json and generation_config.json are written from it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from surgery.concurrency import MODEL_BUILD_LOCK
    from surgery.export import restructure_to_config

    surgery_ckpt = bool(config_dict.get("surgery_layers"))
    with MODEL_BUILD_LOCK:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **({} if surgery_ckpt else {"dtype": dtype}))
    if surgery_ckpt:
        restructure_to_config(model, config_dict)
        model = model.to(dtype)
    else:
        # from_pretrained records the key conversions it used (none, for checkpoints whose names match: a
        # checkpoint that needed some has names no output tensor finds, so it is refused as NotStreamable);
        # save_pretrained then reverts them, which also sorts the state dict, and that order decides the sharding.
        model._weight_conversions = []
        if model.can_generate():
            try:  # as from_pretrained: the directory's generation_config.json wins over the config's fields
                model.generation_config = GenerationConfig.from_pretrained(path, _from_auto=True)
            except OSError:
                pass
    return model.eval()


def _storage_id_on_cpu(t: torch.Tensor):
    """The storage id huggingface_hub would see for this tensor on the CPU: every zero-length tensor has data
    pointer 0 there, so all placeholders count as one shared storage (and go into the first one's shard)."""
    return ("cpu", 0, 0) if t.numel() == 0 else ("meta", id(t))


def split_like_save_pretrained(state: dict[str, torch.Tensor], max_shard_size: str):
    """The shards `save_pretrained` makes (huggingface_hub's split, same state-dict order) of the real model that
    `state` (meta tensors) stands for."""
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

    return split_state_dict_into_shards_factory(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size,
        get_storage_size=lambda t: t.numel() * t.element_size(), get_storage_id=_storage_id_on_cpu,
    )


def build_stream_plan(
    source_dir: Path, config_dict: dict, resolution: Resolution, dtype: torch.dtype, max_shard_size: str = "5GB"
) -> StreamPlan:
    """Prune a meta-device model, and map every tensor it would save to a slice of the input.

    Raises:
        NotStreamable: Some output tensor has no slice of the input behind it.
        SourceError: A safetensors header of the input is corrupt.
    """
    if resolution.shape.spec.cfg_experts:
        raise NotStreamable(f"{resolution.shape.spec.family} checkpoints store experts one by one and the model "
                            "fuses them, a mapping the streaming applier does not do yet")
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from surgery.apply import apply_resolution, rewrite_config
    from surgery.estimate import count_params

    model = source_meta_model(source_dir, config_dict, dtype)
    apply_resolution(model, resolution, factorize=False)
    rewrite_config(model, resolution.shape, resolution.result_shapes(), [c.index for c in resolution.kept_layers])
    # the state dict save_pretrained writes: tied copies dropped, names (and order: it sorts) as checkpoints have them
    state = revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))
    sources = tensor_locations(source_dir)
    reads = tensor_reads(state, resolution, sources)
    split = split_like_save_pretrained(state, max_shard_size)
    shards = [Shard(f, file_order([reads[n] for n in names])) for f, names in sorted(split.filename_to_tensors.items())]
    index = None
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": model.num_parameters(), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
    return StreamPlan(model, sources, shards, index, count_params(model))


def check_free_space(out: Path, plan: StreamPlan, source_dir: Path) -> None:
    """Refuse before writing anything when the disk under `out` cannot hold the result.

    Needed: the exact shard sizes, plus the tokenizer files (about their size in the source) and a margin for the
    small JSON files.
    """
    small = sum(p.stat().st_size for p in source_dir.iterdir()
                if p.is_file() and p.suffix != ".safetensors" and not p.name.startswith("."))
    needed = plan.bytes_written + small + _SMALL_FILES_MARGIN
    probe = out.absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserError(f"not enough disk space for {out}: the result needs {_size(needed)}, "
                        f"{probe} has {_size(free)} free")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def write_model_files(model: nn.Module, tmp: Path) -> None:
    """config.json and generation_config.json, as `save_pretrained` writes them."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    model.config.save_pretrained(tmp)
    if model.can_generate():
        model.generation_config.save_pretrained(tmp)


def write_stream(
    plan: StreamPlan,
    tmp: Path,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> str:
    """Write the shards (and the index) into the directory `tmp`; returns the weights fingerprint of what was
    written (`surgery.fingerprint.weights_fingerprint` of `tmp`, computed while writing)."""
    total = sum(len(s.tensors) for s in plan.shards)
    done = [0]
    step = max(1, total // 50)

    def tick(_read: TensorRead) -> None:
        done[0] += 1
        if progress and (done[0] % step == 0 or done[0] == total):
            progress(f"streaming tensors {done[0]}/{total}")

    reader = SliceReader(plan.sources)
    writer = HashingWriter()
    try:
        factors = FactorCache(reader)
        for shard in plan.shards:  # sorted by name: the order the fingerprint hashes them in
            writer.write_file(tmp / shard.name, shard_pieces(shard.tensors, reader, factors, tick), cancel)
    finally:
        reader.close()
        fingerprint = writer.close()
    if plan.index is not None:  # written as save_pretrained writes it (the whole directory is atomic anyway)
        (tmp / INDEX_NAME).write_text(json.dumps(plan.index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return fingerprint


def save_streamed_dir(
    plan: StreamPlan,
    out: Path,
    *,
    tokenizer=None,
    manifest: dict | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Write the streamed model (+ tokenizer, + manifest) to `out` atomically: `save_model_dir` with the streaming
    writer in place of `save_pretrained`, so everything around the weights is written by the same code."""
    from surgery.export import save_model_dir

    def write_weights(tmp: Path) -> str:
        write_model_files(plan.model, tmp)
        return write_stream(plan, tmp, progress, cancel)

    return save_model_dir(plan.model, out, tokenizer=tokenizer, manifest=manifest, overwrite=overwrite,
                          write_weights=write_weights)


def stream_apply_source(
    plan: Plan,
    v,
    out: Path,
    *,
    required: bool,
    dtype: str = "auto",
    overwrite: bool = False,
    force: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    max_shard_size: str = "5GB",
):
    """The streaming branch of `surgery.pipeline.apply_to_source` (`v`: its Validation, already checked).

    Returns:
        The ApplyResult, or None when the plan cannot stream and streaming was not `required`.

    Raises:
        NotStreamable: `required` and a step (or the source) cannot stream: the first reason, one line.
        UserError: Not enough free disk space for the result (checked before anything is written).
    """
    from surgery.loading import load_tokenizer, parse_dtype, read_config
    from surgery.pipeline import ApplyResult, apply_manifest

    reasons = plan_blockers(plan, pickle_weights=v.resolved.pickle_weights, trust_remote_code=trust_remote_code)
    splan = None
    if not reasons:
        config_dict = read_config(v.resolved)
        try:
            splan = build_stream_plan(v.resolved.path, config_dict, v.resolution, parse_dtype(dtype, config_dict),
                                      max_shard_size)
        except NotStreamable as e:
            reasons.append(str(e))
    if splan is None:
        if required:
            raise NotStreamable(f"cannot stream: {reasons[0]} (run without --stream to apply in memory)")
        return None
    check_free_space(out, splan, v.resolved.path)
    manifest = apply_manifest(plan, v, splan.params_after, force, "stream")
    manifest["apply"].update(bytes_read=splan.bytes_read, bytes_written=splan.bytes_written)
    tokenizer = load_tokenizer(v.resolved, trust_remote_code=trust_remote_code)
    if progress:
        progress("streaming tensors")
    save_streamed_dir(splan, out, tokenizer=tokenizer, manifest=manifest, overwrite=overwrite, progress=progress)
    return ApplyResult(out, v, manifest)


def dry_run_source(
    plan: Plan,
    model: str | None = None,
    *,
    stream: bool | None = None,
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    max_shard_size: str = "5GB",
) -> dict:
    """What `apply` would read and write, from config and safetensors headers alone (no weight byte is read, the
    fingerprint is not computed): `StreamPlan.describe()`, or {"path": "in_memory", "why": [...]} when the plan
    cannot stream.

    Raises:
        NotStreamable: `stream` is True and the plan cannot stream.
        PlanError / SourceError: as `apply`.
    """
    from surgery.loading import parse_dtype, read_config
    from surgery.pipeline import pick_source
    from surgery.resolve import resolve_plan
    from surgery.shapes import shape_from_config
    from surgery.sources import resolve_source

    resolved = resolve_source(pick_source(plan, model), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    config_dict = read_config(resolved)
    resolution = resolve_plan(plan, shape_from_config(config_dict))
    reasons = plan_blockers(plan, pickle_weights=resolved.pickle_weights, trust_remote_code=trust_remote_code)
    if stream is False:
        reasons.insert(0, "--no-stream")
    if not reasons:
        try:
            splan = build_stream_plan(resolved.path, config_dict, resolution, parse_dtype(dtype, config_dict),
                                      max_shard_size)
            return {"source": str(resolved.path), "warnings": resolution.warnings, **splan.describe()}
        except NotStreamable as e:
            reasons.append(str(e))
    if stream:
        raise NotStreamable(f"cannot stream: {reasons[0]} (run without --stream to apply in memory)")
    return {"source": str(resolved.path), "warnings": resolution.warnings, "path": "in_memory", "why": reasons}


__all__ = [
    "NotStreamable",
    "StreamPlan",
    "build_stream_plan",
    "check_free_space",
    "dry_run_source",
    "plan_blockers",
    "save_streamed_dir",
    "stream_apply_source",
    "write_model_files",
    "write_stream",
]
