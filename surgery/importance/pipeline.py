"""`score_source`: what `workbench score` does, as one library call (resolve, load, tokenize, score, describe).

Checks that cost nothing come first (method names, sizes, device), so a typo never waits for a model to load.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from surgery.errors import UserError
from surgery.importance.layerwise import layerwise_methods, open_layerwise, score_checkpoint_layerwise
from surgery.importance.methods import parse_methods
from surgery.importance.runner import PhaseStart, TokenProgress, score_model
from surgery.importance.scorefile import ScoreFile, ScoreMeta

_AUTOCAST = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_DATA_FREE = {"sv", "head_magnitude", "neuron_magnitude"}


def parse_autocast(name: str | None) -> torch.dtype | None:
    """"none" / None -> None, "bf16" / "bfloat16" / "fp16" -> the torch dtype; anything else is a UserError."""
    if name is None or str(name).lower() in ("", "none", "off"):
        return None
    dtype = _AUTOCAST.get(str(name).lower())
    if dtype is None:
        raise UserError(f"unknown --autocast {name!r} (use none, bf16 or fp16)")
    return dtype


def check_on_devices(model: torch.nn.Module) -> None:
    """Refuse a model whose weights accelerate offloaded (meta parameters, moved in at run time): the weight
    scores need the weights, and sv-grad their gradients."""
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise UserError(
            f"the device map offloads {len(offloaded)} weight(s) to CPU or disk (e.g. {offloaded[0]}); scoring "
            "needs every weight on a device: use more GPUs, or --dtype bfloat16"
        )


def describe_devices(model: torch.nn.Module) -> str:
    """"cuda:0,cuda:1": the devices holding the model's weights, in first-use order (the score file's device)."""
    return ",".join(dict.fromkeys(str(p.device) for p in model.parameters()))


def score_source(
    source: str,
    data: str | None,
    methods: str,
    *,
    tokens: int | None = 16384,
    seq_len: int = 256,
    batch_size: int = 8,
    device: str | None = None,
    device_map: str | dict | None = None,
    dtype: str = "float32",
    autocast: str | None = None,
    text_field: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    layerwise: bool = False,
    progress: TokenProgress | None = None,
    status: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
    phase: PhaseStart | None = None,
) -> ScoreFile:
    """Score a model source on calibration text; returns the scores with their metadata (not yet saved).

    Args:
        source: model source (HF directory, hub id, .gguf, "smollm2-135m").
        data: calibration text (see surgery.data); may be None only for data-free methods (sv, *-magnitude).
        methods: comma-separated method names or aliases (see surgery.importance.methods).
        tokens, seq_len, batch_size: calibration size: the first tokens // seq_len blocks, batched in order.
        device, dtype: where (default cpu) and in which dtype to load the weights.
        device_map: instead of `device`, spread the layers over several devices (a model larger than one GPU):
            "auto", "balanced", "balanced_low_0", "sequential" or {module path: device} (see load_model).
        autocast: "bf16"/"fp16" to run the passes under torch.autocast (GPU), None for the weights' dtype.
        progress: progress(done, total) within the current phase (tokens in the passes, matrices in the SVDs).
        status: one-line messages while the model is fetched, loaded and the text tokenized.
        layerwise: hold one decoder block at a time on `device` (forward-only and weight methods; see
            surgery.importance.layerwise): a model larger than the device scores on it.
        cancel: set it to stop between batches (raises Cancelled).
        phase: phase(name, total, unit) when a scoring phase starts (see `score_model`).
    """
    from surgery.arch import spec_for_config
    from surgery.data import load_blocks
    from surgery.loading import check_placement, load_model, parse_dtype
    from surgery.pipeline import source_fingerprint, versions

    chosen = layerwise_methods(methods) if layerwise else parse_methods(methods)
    metrics = {m.metric for m in chosen}
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (got {seq_len})")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    if tokens is not None and tokens < seq_len:
        raise UserError(f"--tokens ({tokens}) must be at least --seq-len ({seq_len})")
    needs_data = bool(metrics - _DATA_FREE)
    if needs_data and not data:
        raise UserError("these methods need calibration text: pass --data FILE (e.g. wiki.test.raw)")
    if layerwise and device_map is not None:
        raise UserError("--layerwise holds one block at a time on one --device: drop --device-map")
    device, device_map = check_placement(device, device_map)
    parse_dtype(dtype)
    autocast_dtype = parse_autocast(autocast)

    say = status or (lambda message: None)
    if layerwise:  # no model is loaded: config, tokenizer, then one block at a time
        loaded = open_layerwise(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                progress=status)
        chosen = layerwise_methods(methods, arch=spec_for_config(loaded.config_dict))
    else:
        loaded = load_model(source, dtype=dtype, device=device, device_map=device_map, allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code, progress=status)
        check_on_devices(loaded.model)
        chosen = parse_methods(methods, arch=spec_for_config(loaded.config_dict))  # aliases: the model's axes only
    say("fingerprinting weights")
    fingerprint = source_fingerprint(loaded.resolved)
    blocks = None
    if needs_data:
        say("tokenizing calibration text")
        blocks = load_blocks(data, loaded.tokenizer, seq_len, tokens, text_field=text_field)
    batches = list(blocks.batches(batch_size)) if blocks is not None else []
    say("scoring")
    start = time.perf_counter()
    if layerwise:
        weights_dtype = parse_dtype(dtype, loaded.config_dict)
        tensors = score_checkpoint_layerwise(loaded.resolved, loaded.config_dict, batches, chosen, device=device,
                                             dtype=weights_dtype, autocast_dtype=autocast_dtype, progress=progress,
                                             cancel=cancel, phase=phase)
    else:
        weights_dtype = next(loaded.model.parameters()).dtype
        tensors = score_model(loaded.model, batches, chosen, autocast_dtype=autocast_dtype, progress=progress,
                              cancel=cancel, phase=phase)
    seconds = time.perf_counter() - start
    import surgery

    meta = ScoreMeta(
        methods=[m.name for m in chosen],
        model_source=loaded.resolved.original,
        model_fingerprint=fingerprint,
        family=loaded.config_dict.get("model_type"),
        data_source=blocks.source if blocks else None,
        data_fingerprint=blocks.fingerprint if blocks else None,
        tokens=blocks.num_tokens if blocks else 0,
        seq_len=blocks.seq_len if blocks else None,
        batch_size=batch_size if blocks else None,
        dtype=str(weights_dtype).removeprefix("torch."),
        autocast=str(autocast_dtype).removeprefix("torch.") if autocast_dtype else None,
        device=device if device_map is None else describe_devices(loaded.model),
        library_version=surgery.__version__,
        versions=versions(),
        seconds=round(seconds, 3),
        layerwise=True if layerwise else None,
    )
    return ScoreFile(meta, tensors)
