"""Streaming apply: a structural plan written straight from slices of the input safetensors, no model in memory.

Data flow: the source's config builds the model on the meta device (no memory), the plan's cuts run on it
(shapes only) and `rewrite_config` makes its config truthful, exactly as the in-memory path does to the real
model. Its state dict names every output tensor with shape and dtype; `tensor_reads` maps each one back to a
slice of an input tensor; the writer lays them out in the files `save_pretrained` would write (same sharding,
same tensor order, same header) and hashes them as they are written. So the result is byte-identical to
load + apply + save, at about one tensor of memory.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from surgery.errors import UserError
from surgery.plan import Plan
from surgery.resolve import Resolution
from surgery.stream.blockers import plan_blockers
from surgery.stream.files import StreamPlan, assemble, write_index
from surgery.stream.reads import NotStreamable, TensorRead
from surgery.stream.source import TORCH_NAMES, SourceTensor, tensor_locations
from surgery.stream.writer import FactorCache, HashingWriter, SliceReader, shard_pieces

Progress = Callable[[str], None]
_ST_NAMES = {getattr(torch, name): st for st, name in TORCH_NAMES.items()}
_SMALL_FILES_MARGIN = 1 << 20  # config, generation config, index, manifest: well under a MiB


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


def build_stream_plan(
    source_dir: Path, config_dict: dict, resolution: Resolution, dtype: torch.dtype, max_shard_size: str = "5GB",
    sources: dict[str, SourceTensor] | None = None,
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
    shapes = {name: (_ST_NAMES[t.dtype], tuple(t.shape)) for name, t in state.items()}
    sources = tensor_locations(source_dir) if sources is None else sources
    return assemble(shapes, resolution, sources, max_shard_size, params=count_params(model), model=model)


def check_free_space(out: Path, plan: StreamPlan, copied: list[Path], spill: int = 0) -> None:
    """Refuse before writing anything when the disk under `out` cannot hold the result.

    Needed: the exact shard sizes, the exact sizes of the files copied in (`copied`: the tokenizer's), a margin
    for the small JSON files written beside them (config, generation config, index, manifest), and `spill`: the
    bytes of the data steps' spill files (surgery.stream.datasteps), which exist beside the shards until the end.
    """
    needed = plan.bytes_written + sum(p.stat().st_size for p in copied) + _SMALL_FILES_MARGIN + spill
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
        write_index(tmp, plan.index)
    return fingerprint


def save_streamed_dir(
    plan: StreamPlan,
    out: Path,
    *,
    tokenizer=None,
    tokenizer_from: Path | None = None,
    manifest: dict | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    prepare: Callable[[Path], contextlib.AbstractContextManager[StreamPlan]] | None = None,
) -> Path:
    """Write the streamed model (+ tokenizer, + manifest) to `out` atomically: `save_model_dir` with the streaming
    writer in place of `save_pretrained`, so everything around the weights is written by the same code.

    `tokenizer_from`: a source directory whose tokenizer's save_pretrained output is copied in (from the cache:
    surgery.stream.tokenizer), instead of saving a loaded `tokenizer`. `prepare(tmp)`: a context that gives the
    plan to write instead of `plan`, entered in the temporary output directory before the shards are written
    (the data steps' fit and its spill: surgery.stream.datasteps).
    """
    from surgery.export import save_model_dir

    def write_weights(tmp: Path) -> str:
        write_model_files(plan.model, tmp)
        if tokenizer_from is not None:
            from surgery.stream.tokenizer import copy_tokenizer

            copy_tokenizer(tokenizer_from, tmp)
        with prepare(tmp) if prepare is not None else contextlib.nullcontext(plan) as to_write:
            return write_stream(to_write, tmp, progress, cancel)

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
    cancel: threading.Event | None = None,
    max_shard_size: str = "5GB",
):
    """The streaming branch of `surgery.pipeline.apply_to_source` (`v`: its Validation, already checked).

    Data-driven steps (reconstruct, whitened / asvd low rank) are fitted layer by layer from the input first, their
    tensors spilled beside the output and streamed from there (surgery.stream.datasteps).

    Returns:
        The ApplyResult, or None when the plan cannot stream and streaming was not `required`.

    Raises:
        NotStreamable: `required` and a step (or the source) cannot stream: the first reason, one line.
        UserError: Not enough free disk space for the result (checked before anything is written), calibration
            text that is not the plan's or too short (likewise).
    """
    from surgery.loading import parse_dtype, read_config
    from surgery.pipeline import ApplyResult, apply_manifest, calibration_blocks

    reasons = plan_blockers(plan, pickle_weights=v.resolved.pickle_weights, trust_remote_code=trust_remote_code)
    splan = fit = None
    if not reasons:
        config_dict = read_config(v.resolved)
        torch_dtype = parse_dtype(dtype, config_dict)
        try:
            splan = build_stream_plan(v.resolved.path, config_dict, v.resolution, torch_dtype, max_shard_size)
            if v.resolution.needs_data:
                from surgery.stream.datasteps import SpilledFit

                fit = SpilledFit(splan, v.resolution)
        except NotStreamable as e:
            splan = None
            reasons.append(str(e))
    if splan is None:
        if required:
            raise NotStreamable(f"cannot stream: {reasons[0]} (run without --stream to apply in memory)")
        return None
    from surgery.stream.tokenizer import cached_tokenizer_files

    blocks = calibration_blocks(v, trust_remote_code) if fit is not None else None
    # a tokenizer that cannot load is refused before anything is written, and its files' sizes are exact
    check_free_space(out, splan, cached_tokenizer_files(v.resolved.path), fit.spill_bytes if fit else 0)
    manifest = apply_manifest(plan, v, splan.params_after, force, "stream")
    planned = fit.plan if fit else splan
    manifest["apply"].update(bytes_read=planned.bytes_read, bytes_written=planned.bytes_written)
    prepare = None
    if fit is not None:
        from surgery.stream.datasteps import LAYER_BY_LAYER, run_layerwise_fit

        manifest["apply"].update(data_steps=LAYER_BY_LAYER, spill_bytes=fit.spill_bytes)
        run = run_layerwise_fit(v.resolved.path, config_dict, v.resolution, blocks, torch_dtype, manifest,
                                progress, cancel)

        def prepare(tmp: Path):
            return fit.fitted(tmp, run)
    if progress:
        progress("fitting data steps layer by layer" if fit else "streaming tensors")
    save_streamed_dir(splan, out, tokenizer_from=v.resolved.path, manifest=manifest, overwrite=overwrite,
                      progress=progress, cancel=cancel, prepare=prepare)
    return ApplyResult(out, v, manifest)


__all__ = [
    "NotStreamable",
    "StreamPlan",
    "build_stream_plan",
    "check_free_space",
    "plan_blockers",
    "save_streamed_dir",
    "stream_apply_source",
    "write_model_files",
    "write_stream",
]
