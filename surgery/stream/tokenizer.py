"""The tokenizer files of a streamed output: what `tokenizer.save_pretrained` writes, cached by content.

A structural plan never touches the vocabulary, so the output's tokenizer files are what loading the source's
tokenizer and saving it again writes: the same bytes every time for the same input files and transformers
version. That round trip is not a plain copy (a tokenizer_config.json written by another version comes back
rewritten), and costs as much as streaming the demo's weights (the tokenizer imports, parsing a 2 MB
tokenizer.json), so it runs once per distinct tokenizer: its output is kept in the user cache under
`tokenizers/<sha256 of the inputs>/` and copied byte for byte into every later output.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from surgery.cache import building_dir, cache_root, file_lock, is_complete

# files that hold weights (never read by a tokenizer, and large): everything else in the source may be read
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_NO_TOKENIZER = ".no-tokenizer"  # marks a cached round trip that found no tokenizer


def round_trip_key(source_dir: Path) -> str:
    """sha256 over the transformers version and every non-weight file of `source_dir` (name and content)."""
    from importlib.metadata import version  # not `import transformers`: the version is all that is needed

    h = hashlib.sha256(f"transformers {version('transformers')}\n".encode())
    for path in sorted(source_dir.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name.endswith(_WEIGHT_SUFFIXES) \
                or path.name.endswith(".index.json"):
            continue
        h.update(path.name.encode("utf-8") + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def cached_tokenizer_files(source_dir: Path, trust_remote_code: bool = False) -> list[Path]:
    """The files `load_tokenizer(source_dir).save_pretrained(DIR)` writes into DIR, from the cache (built on the
    first call); empty when the source has no tokenizer.

    Raises:
        SourceError: Tokenizer files exist but cannot be loaded (as `surgery.loading.load_tokenizer`).
    """
    key = round_trip_key(source_dir)
    entry = cache_root() / "tokenizers" / key
    if not is_complete(entry):
        with file_lock(f"tokenizer-{key}"):
            if not is_complete(entry):
                from surgery.loading import load_tokenizer

                tokenizer = load_tokenizer(source_dir, trust_remote_code=trust_remote_code)
                with building_dir(entry) as tmp:
                    if tokenizer is None:
                        (tmp / _NO_TOKENIZER).write_text("no tokenizer in the source\n", encoding="utf-8")
                    else:
                        tokenizer.save_pretrained(tmp)
    return sorted(p for p in entry.iterdir() if p.is_file() and not p.name.startswith("."))


def copy_tokenizer(source_dir: Path, out_dir: Path, trust_remote_code: bool = False) -> None:
    """Write the tokenizer files of `source_dir` into `out_dir`, as its tokenizer's save_pretrained would."""
    for path in cached_tokenizer_files(source_dir, trust_remote_code):
        shutil.copyfile(path, out_dir / path.name)
