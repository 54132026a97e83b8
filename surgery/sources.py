"""Turn what the user typed (a directory, a .gguf file, a hub id, the demo alias) into a local HF directory.

Everything downstream (loading, surgery, export) sees one shape: a directory with config.json and safetensors.
A .gguf file is converted once into such a directory in the user cache, because a model loaded from GGUF refuses
`save_pretrained` (KNOWN_TRAPS 1) although its weights are already dequantized.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from surgery.cache import building_dir, cache_root, file_lock, is_complete
from surgery.errors import SourceError
from surgery.shards import index_shards

SourceKind = Literal["hf_dir", "gguf", "hub", "demo"]
Progress = Callable[[str], None] | None

DEMO_ALIASES = ("smollm2-135m",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.jinja",
    "chat_template.json",
]


@dataclass(frozen=True)
class ResolvedSource:
    """A model source resolved to a local HF directory.

    Attributes:
        kind: "hf_dir", "gguf", "hub" or "demo".
        path: A local directory with config.json and the weights (for gguf/demo: the converted cache directory).
        original: What the user typed.
        gguf_file: The .gguf file the directory was converted from, if any.
        pickle_weights: The directory holds only pickled weights (resolved with allow_pickle=True); load them with
            `torch.load(weights_only=True)`.
    """

    kind: SourceKind
    path: Path
    original: str
    gguf_file: Path | None = None
    pickle_weights: bool = False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json and friends), as a dict.

    Raises:
        SourceError: It is missing, unreadable, not JSON, or not a JSON object.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"no such file or directory: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read {path} ({_first_line(e)})") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"corrupt JSON in {path} (line {e.lineno} column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise SourceError(f"corrupt JSON in {path} (expected an object, got {type(data).__name__})")
    return data


def read_config_file(directory: Path) -> dict:
    """config.json of `directory` as a dict.

    Raises:
        SourceError: It is missing ("not a model directory"), unreadable or corrupt.
    """
    if not (directory / "config.json").is_file():
        raise SourceError(f"not a model directory: {directory} (no config.json)")
    return read_json_object(directory / "config.json")


def _check_hf_dir(directory: Path, *, allow_pickle: bool) -> bool:
    """Validate a HF directory; returns True when its weights are pickles (allowed by `allow_pickle`)."""
    read_config_file(directory)
    shards = index_shards(directory)  # refuses shards outside the directory
    if shards is not None:
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            raise SourceError(f"missing safetensors shard(s) in {directory}: {', '.join(missing)}")
        pickled = [s for s in shards if not s.endswith(".safetensors")]
        if pickled and not allow_pickle:
            raise SourceError(
                f"the safetensors index of {directory} names non-safetensors shard(s) ({', '.join(pickled)}); "
                "pickles can run code when loaded: pass --allow-pickle if you trust them"
            )
        return False
    if any(p.suffix == ".safetensors" for p in directory.iterdir() if p.is_file()):
        return False
    pickles = sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix in _PICKLE_SUFFIXES)
    if not pickles:
        raise SourceError(f"no weights in {directory} (expected *.safetensors)")
    if not allow_pickle:
        raise SourceError(
            f"{directory} holds only pickled weights ({', '.join(pickles)}); pickles can run code when loaded: "
            "pass --allow-pickle if you trust them (they are then loaded with torch.load(weights_only=True))"
        )
    return True


# ---------------------------------------------------------------------------------------------------- GGUF ----


def check_gguf(path: Path) -> None:
    """Cheap integrity check of a .gguf file (memory-mapped header and tensor table, no dequantization).

    Raises:
        SourceError: The file is missing, truncated or not GGUF.
    """
    import gguf  # imported lazily: it pulls numpy memmaps and a big constants table

    if not path.is_file():
        raise SourceError(f"no such file or directory: {path}")
    try:
        reader = gguf.GGUFReader(path)
        size = path.stat().st_size
        # The reader maps tensor views lazily in some versions: check that every tensor lies inside the file.
        for t in reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError(f"tensor {t.name} ends past the end of the file")
    except Exception as e:  # numpy/gguf raise ValueError, IndexError, struct errors... all mean "bad file"
        raise SourceError(f"corrupt or truncated GGUF file: {path} ({_first_line(e)})") from None


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' tqdm bars: a library must not draw into its caller's terminal (or TUI)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF dequantization loop calls tqdm directly, bypassing the switch above.
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if enabled:
            hf_logging.enable_progress_bar()


def convert_gguf(gguf_path: Path, target: Path, *, progress: Progress = None) -> Path:
    """Convert a .gguf file into a plain HF directory at `target` (fp32 safetensors + tokenizer), atomically.

    A no-op when `target` is already complete. The caller should hold a lock for `target`.

    Args:
        gguf_path: The .gguf file.
        target: The directory to create.
        progress: Called with one-line status messages.

    Returns:
        `target`.

    Raises:
        SourceError: The file is corrupt or its architecture cannot be loaded by transformers.
    """
    if is_complete(target):
        return target
    check_gguf(gguf_path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():  # transformers' GGUF loader insists on it
        raise SourceError(f"converting {gguf_path.name} needs the accelerate package: pip install accelerate")

    if progress:
        progress(f"converting {gguf_path.name} to a safetensors directory (once)")
    from surgery.concurrency import MODEL_BUILD_LOCK

    with MODEL_BUILD_LOCK, quiet_progress_bars(), building_dir(target) as tmp:
        try:
            gguf_model, info = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, output_loading_info=True
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError, IndexError) as e:
            raise SourceError(f"cannot load GGUF file with transformers: {gguf_path} ({_first_line(e)})") from None
        missing = sorted(info.get("missing_keys") or [])
        if missing:  # transformers would fill them with random values and only warn
            raise SourceError(f"GGUF file lacks {len(missing)} tensor(s): {gguf_path} (e.g. {missing[0]})")
        # KNOWN_TRAPS 1: rebuild a plain model from the config minus quantization_config, copy the weights in.
        cfg = gguf_model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_model_name_or_path", None)  # GGUF's general.name leaks in here; noise in config.json
        config = type(gguf_model.config).from_dict(cfg)
        model = type(gguf_model)(config).to(torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.eval()
        del gguf_model  # halve peak memory before writing
        model.save_pretrained(tmp)
        from surgery.export.hf import add_legacy_keys  # lazy: export imports the surgery stack

        add_legacy_keys(tmp / "config.json")  # transformers 4.x readers of the converted directory
        tokenizer.save_pretrained(tmp)
        (tmp / "converted_from.json").write_text(
            json.dumps({"gguf_file": str(gguf_path), "gguf_size": gguf_path.stat().st_size}, indent=1) + "\n",
            encoding="utf-8",
        )
    return target


def _resolve_gguf(path: Path, progress: Progress) -> Path:
    from surgery.fingerprint import weights_fingerprint

    # Only the magic here: the full check parses the whole header (~4 s for the demo's vocabulary), so it runs only
    # when a conversion is needed.
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SourceError(f"cannot read {path} ({_first_line(e)})") from None
    if magic != b"GGUF":
        raise SourceError(f"corrupt or truncated GGUF file: {path} (bad magic {magic!r})")
    key = weights_fingerprint(path).removeprefix("sha256:")
    target = cache_root() / "gguf" / key
    if is_complete(target):
        return target
    with file_lock(f"gguf-{key}"):
        return convert_gguf(path, target, progress=progress)


# ----------------------------------------------------------------------------------------------------- hub ----


def _resolve_hub(repo_id: str, *, allow_pickle: bool, trust_remote_code: bool, progress: Progress) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    patterns = list(_HUB_PATTERNS)
    if allow_pickle:
        patterns += ["*.bin", "pytorch_model.bin.index.json"]
    if trust_remote_code:
        patterns += ["*.py"]
    if progress:
        progress(f"fetching {repo_id} from the Hugging Face Hub (cached after the first time)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError:
        raise SourceError(f"{repo_id} is gated on the Hugging Face Hub: accept its terms and log in first") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise SourceError(f"no such model on the Hugging Face Hub (or no access): {repo_id}") from None
    except Exception as e:  # offline, DNS, HTTP 5xx, timeouts: all "unreachable" from the user's point of view
        raise SourceError(f"cannot download {repo_id} from the Hugging Face Hub ({_first_line(e)})") from None


# ------------------------------------------------------------------------------------------------- resolve ----


def resolve_source(
    source: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Progress = None,
) -> ResolvedSource:
    """Resolve a model source to a local HF directory.

    Rules, in order: an existing directory is a HF directory; a path ending in .gguf is converted once into the
    cache; the alias "smollm2-135m" is the demo model; "org/name" that is not a path is a Hugging Face Hub id.

    Args:
        source: A directory, a .gguf file, a hub id or the demo alias.
        allow_pickle: Accept directories whose weights are only pickles (pytorch_model.bin, *.pt, *.pth).
        trust_remote_code: Also download *.py files of hub repos (the loader decides whether to run them).
        progress: Called with one-line status messages during long steps (download, conversion).

    Returns:
        The resolved source.

    Raises:
        SourceError: The source cannot be found, read or converted.
    """
    text = str(source).strip()
    if not text:
        raise SourceError("empty model source: give a directory, a .gguf file, a hub id or smollm2-135m")
    path = Path(text).expanduser()
    if path.is_dir():
        path = path.absolute()
        pickled = _check_hf_dir(path, allow_pickle=allow_pickle)
        return ResolvedSource("hf_dir", path, text, None, pickled)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise SourceError(f"no such file or directory: {text}")
        path = path.absolute()
        return ResolvedSource("gguf", _resolve_gguf(path, progress), text, path)
    if text.lower() in DEMO_ALIASES and not path.exists():
        from surgery.demo import demo_gguf_path, fetch_demo

        directory = fetch_demo(progress=progress)
        return ResolvedSource("demo", directory, text, demo_gguf_path())
    if path.exists():
        raise SourceError(f"not a model source: {text} (expected a model directory or a .gguf file)")
    if _HUB_ID.match(text):
        directory = _resolve_hub(
            text, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, progress=progress
        )
        if not allow_pickle and not any(directory.glob("*.safetensors")):
            # Only safetensors were downloaded: the repo may still have pickles the user could opt into.
            raise SourceError(f"{text} has no safetensors weights on the Hub (pickles need --allow-pickle)")
        pickled = _check_hf_dir(directory, allow_pickle=allow_pickle)
        return ResolvedSource("hub", directory, text, None, pickled)
    raise SourceError(f"no such file or directory: {text}")
