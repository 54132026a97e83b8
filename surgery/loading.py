"""Load a resolved source into memory: model (eval mode), tokenizer, config.

Surgery checkpoints (config.json with "surgery_layers") go through `surgery.export.load_surgery_checkpoint`;
everything else through plain `AutoModelForCausalLM.from_pretrained`. Pickled weights (only when the user allowed
them) are read with `torch.load(weights_only=True)`, which refuses arbitrary objects.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.concurrency import MODEL_BUILD_LOCK
from surgery.errors import SourceError
from surgery.fingerprint import weight_files
from surgery.inspect import check_config_against_weights  # noqa: F401 (its home is torch-free inspect)
from surgery.sources import (
    Progress,
    ResolvedSource,
    quiet_progress_bars,
    read_config_file,
    read_json_object,
    resolve_source,
)

_DTYPES: dict[str, torch.dtype | None] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "auto": None,  # the checkpoint's own dtype (config.json "dtype"), else float32
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Errors from_pretrained raises for bad checkpoints (not bugs of ours): report them as one line.
_LOAD_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError, KeyError, TypeError)
try:
    from safetensors import SafetensorError

    _LOAD_ERRORS += (SafetensorError,)
except ImportError:  # pragma: no cover
    pass


@dataclass
class LoadedModel:
    """A model ready to run.

    Attributes:
        model: The model, in eval mode, on the requested device.
        tokenizer: Its tokenizer, or None when the directory has no tokenizer files.
        resolved: Where it came from.
        config_dict: config.json as a dict.
    """

    model: Any
    tokenizer: Any | None
    resolved: ResolvedSource
    config_dict: dict


def _line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def parse_dtype(dtype: str | torch.dtype, config_dict: dict | None = None) -> torch.dtype:
    """Turn "float32" / "bf16" / "auto" / a torch floating dtype into a torch dtype.

    Args:
        dtype: The requested dtype.
        config_dict: For "auto": the checkpoint's config, whose "dtype" (or "torch_dtype") is used.

    Raises:
        SourceError: Unknown or non-floating dtype.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise SourceError(f"unsupported dtype: {dtype} (use float32, float16 or bfloat16)")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise SourceError(f"unknown dtype: {dtype!r} (use float32, float16, bfloat16 or auto)")
    resolved = _DTYPES[key]
    if resolved is None:
        saved = str((config_dict or {}).get("dtype") or (config_dict or {}).get("torch_dtype") or "float32")
        resolved = _DTYPES.get(saved.lower().removeprefix("torch."), torch.float32) or torch.float32
    return resolved


def check_device(device: str) -> torch.device:
    """Parse `device` and make sure this machine has it.

    Raises:
        SourceError: Unknown device string, or the device is not available here.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise SourceError(f"unknown device: {device!r} (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SourceError(f"device {device!r} requested but CUDA is not available here: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SourceError(f"no such CUDA device: {device} (this machine has {torch.cuda.device_count()})")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise SourceError(f"device {device!r} requested but MPS is not available on this machine: use --device cpu")
        return dev
    raise SourceError(f"unsupported device: {device!r} (use cpu, cuda, cuda:N or mps)")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | dict[str, str | int]


def check_device_map(device_map: DeviceMap) -> DeviceMap:
    """Check a device_map before anything loads: one of DEVICE_MAPS, or {module path: device} with devices here.

    Raises:
        SourceError: Unknown strategy, empty map, or a device this machine lacks.
    """
    if isinstance(device_map, str):
        key = device_map.strip().lower()
        if key not in DEVICE_MAPS:
            raise SourceError(f"unknown device map {device_map!r} (use {', '.join(DEVICE_MAPS)})")
        return key
    if not isinstance(device_map, dict) or not device_map:
        raise SourceError("a device map is a strategy (auto) or a non-empty {module path: device} mapping")
    for name, dev in device_map.items():
        if dev != "disk":  # accelerate offloads "disk" entries; scoring refuses offloaded weights later
            check_device(f"cuda:{dev}" if isinstance(dev, int) else str(dev))
    return device_map


def check_placement(device: str | None, device_map: DeviceMap | None) -> tuple[str | None, DeviceMap | None]:
    """Check where a model is to go: one device (default "cpu") or a device map, never both.

    Returns:
        (device, None) or (None, the normalised device map).

    Raises:
        SourceError: Both given, or a device / device map this machine cannot use.
    """
    if device is not None and device_map is not None:
        raise SourceError("pass either a device (--device) or a device map (--device-map), not both")
    if device_map is not None:
        return None, check_device_map(device_map)
    device = device or "cpu"
    check_device(device)
    return device, None


def _dispatch(model: Any, device_map: DeviceMap) -> Any:
    """Spread a model built on CPU over devices with accelerate (surgery checkpoints and pickled weights)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = getattr(model, "_no_split_modules", None)
        max_memory = None
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    return dispatch_model(model, device_map)


def read_config(resolved_or_path: ResolvedSource | Path | str) -> dict:
    """config.json of a resolved source, of a model directory, or at a given .json path, as a dict.

    Raises:
        SourceError: Missing, unreadable or corrupt config.
    """
    if isinstance(resolved_or_path, ResolvedSource):
        return read_config_file(resolved_or_path.path)
    path = Path(resolved_or_path).expanduser()
    if path.is_file():
        return read_json_object(path)
    if not path.exists():
        raise SourceError(f"no such file or directory: {path}")
    return read_config_file(path)


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """Silence transformers' multi-line "LOAD REPORT" (missing / mismatched tensors) while a model loads: the
    caller refuses those cases itself in one line, and a library must not draw into its caller's terminal."""
    log = logging.getLogger("transformers")  # its modules' loggers inherit this level
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def load_tokenizer(resolved: ResolvedSource | Path | str, *, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer saved next to the model, or None when the directory has none.

    Raises:
        SourceError: Tokenizer files exist but cannot be loaded.
    """
    from transformers import AutoTokenizer

    directory = resolved.path if isinstance(resolved, ResolvedSource) else Path(resolved).expanduser()
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as e:
        raise SourceError(f"cannot load the tokenizer in {directory} ({_line(e)})") from None


def _load_pickled(directory: Path, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    """Build the model from config.json and fill it from pickles read with torch.load(weights_only=True)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        try:
            part = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/unpickler errors of every kind: the file is not a plain tensor dict
            raise SourceError(f"cannot load {f} with torch.load(weights_only=True) ({_line(e)})") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise SourceError(f"{f} is not a state dict (a mapping of names to tensors)")
        state.update(part)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
        with MODEL_BUILD_LOCK:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as e:
        raise SourceError(f"cannot build the model from {directory / 'config.json'} ({_line(e)})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied weight (lm_head = embed_tokens) may be saved once: missing is fine if one of its aliases was loaded.
    aliases: dict[int, set[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(t), set()).add(name)
    by_name = {n: names for names in aliases.values() for n in names}
    missing = [k for k in missing if not (by_name.get(k, set()) & state.keys())]
    if missing or unexpected:
        raise SourceError(
            f"weights in {directory} do not match its config: {len(missing)} missing "
            f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})"
        )
    return model


def load_model(
    source: str | ResolvedSource,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    device_map: DeviceMap | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Progress = None,
) -> LoadedModel:
    """Resolve (if needed) and load a model, its tokenizer and its config.

    Args:
        source: What the user typed (see `resolve_source`) or an already resolved source.
        dtype: "float32", "float16", "bfloat16", "auto" (aliases fp32/fp16/bf16/half) or a torch dtype.
        device: "cpu" (the default), "cuda", "cuda:N" or "mps": the whole model on one device.
        device_map: Instead of `device`, spread the layers over the devices (a model larger than one GPU):
            "auto" / "balanced" / "balanced_low_0" / "sequential" or {module path: device}, as in
            `from_pretrained(device_map=...)` (accelerate). On a CPU-only machine "auto" puts everything on CPU.
        allow_pickle: Accept pickled weights (see `resolve_source`).
        trust_remote_code: Let transformers run the model repo's own code.
        progress: Called with one-line status messages while a source is fetched or converted.

    Returns:
        The loaded model in eval mode, with tokenizer (or None), resolved source and config dict.

    Raises:
        SourceError: Bad source, dtype, device or device map (or both a device and a device map), or weights
            that do not fit the config.
    """
    device, device_map = check_placement(device, device_map)  # cheap checks first: nothing fetched in vain
    if not isinstance(dtype, torch.dtype):
        parse_dtype(dtype)
    resolved = source if isinstance(source, ResolvedSource) else resolve_source(
        source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, progress=progress
    )
    config_dict = read_config(resolved)
    torch_dtype = parse_dtype(dtype, config_dict)
    check_config_against_weights(resolved)

    if "surgery_layers" in config_dict:
        from surgery.export import load_surgery_checkpoint  # lazy: export imports the whole surgery stack

        model = load_surgery_checkpoint(resolved.path, dtype=torch_dtype, device=device or "cpu")
    elif resolved.pickle_weights:
        model = _load_pickled(resolved.path, torch_dtype, trust_remote_code)
    else:
        try:
            with MODEL_BUILD_LOCK, quiet_progress_bars(), quiet_load_report():
                from transformers import AutoModelForCausalLM  # under the lock: lazy imports race in threads

                model, info = AutoModelForCausalLM.from_pretrained(
                    resolved.path,
                    dtype=torch_dtype,
                    trust_remote_code=trust_remote_code,
                    use_safetensors=True,  # never fall back to pickles lying next to the safetensors
                    output_loading_info=True,
                    **({"device_map": device_map} if device_map is not None else {}),
                )
        except _LOAD_ERRORS as e:
            if "ignore_mismatched_sizes" in str(e):  # its text points at the report silenced above
                raise SourceError(f"tensor shapes in {resolved.path} do not match its config.json") from None
            raise SourceError(f"cannot load the model in {resolved.path} ({_line(e)})") from None
        # from_pretrained only warns about missing tensors and initialises them randomly: refuse instead.
        missing = list(info.get("missing_keys") or [])
        if missing:
            raise SourceError(f"{len(missing)} weight(s) missing from {resolved.path} (e.g. {sorted(missing)[0]})")
    if device_map is None:
        model = model.to(device)
    elif "surgery_layers" in config_dict or resolved.pickle_weights:
        model = _dispatch(model, device_map)  # built on CPU (not by from_pretrained): spread it now
    model.eval()
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, resolved=resolved, config_dict=config_dict)
