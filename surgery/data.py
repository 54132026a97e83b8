"""Calibration and evaluation text: the one contract every score and every metric follows.

1. Text from a file (.txt; .jsonl with a text field; .parquet with a text column) or a Hugging Face dataset
   (`hf:NAME[:CONFIG[:SPLIT]]`, via the `datasets` library, when the hub is reachable). Records are joined with
   "\\n\\n".
2. The whole text is tokenized as ONE string with the model's tokenizer, without special tokens.
3. The ids are cut into consecutive blocks of `seq_len` tokens; the first `max_tokens // seq_len` blocks are kept
   (all full blocks when `max_tokens` is None); a trailing partial block is dropped.
4. Blocks are batched in file order. Each block predicts its own next tokens: seq_len - 1 targets per block.
5. `fingerprint` = sha256 of the kept token ids (int64 little-endian): two numbers are compared only when they were
   measured on the same tokens.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.errors import UserError
from surgery.fingerprint import tokens_fingerprint

TEXT_FIELDS = ("text", "content", "document")


def read_text(source: str | Path, *, text_field: str | None = None) -> str:
    """The raw text of a data source, records joined with "\\n\\n" (see the module docstring)."""
    source = str(source)
    if source.startswith("hf:"):
        return _read_hf_dataset(source[3:], text_field)
    path = Path(source).expanduser()
    check_data_file(source)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return "\n\n".join(_jsonl_records(path, text_field))
        if suffix == ".parquet":
            return "\n\n".join(_parquet_records(path, text_field))
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"data file is not UTF-8 text: {path} ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"cannot read data file {source}: {exc.strerror or exc}") from None


def check_data_file(source: str | Path) -> None:
    """A data file must be a regular file: one line for a missing path, a directory, a device (/dev/zero would be
    read forever) or a pipe (commands may read the text more than once; a pipe gives it only once).

    Raises:
        UserError: Anything but a readable regular file.
    """
    try:
        mode = Path(source).expanduser().stat().st_mode
    except FileNotFoundError:
        raise UserError(f"no such data file: {source}") from None
    except OSError as exc:
        raise UserError(f"cannot read data file {source}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"data file {source} is a directory: name a .txt, .jsonl or .parquet file")
    if stat.S_ISFIFO(mode):
        raise UserError(f"data file {source} is a pipe: write the text to a file first (it may be read more "
                        "than once)")
    if not stat.S_ISREG(mode):
        raise UserError(f"data file {source} is not a regular file (a device or a socket)")


def _pick_field(record: dict, text_field: str | None, where: str) -> str:
    fields = (text_field,) if text_field else TEXT_FIELDS
    for name in fields:
        if name in record and isinstance(record[name], str):
            return record[name]
    raise UserError(f"{where}: no text field (looked for {', '.join(fields)}; choose one with --text-field)")


def _jsonl_records(path: Path, text_field: str | None) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{n}: malformed JSON line ({exc.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{n}: expected a JSON object per line")
            yield _pick_field(record, text_field, f"{path}:{n}")


def _parquet_records(path: Path, text_field: str | None) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path)
    names = (text_field,) if text_field else TEXT_FIELDS
    column = next((n for n in names if n in table.column_names), None)
    if column is None:
        raise UserError(f"{path}: no text column (looked for {', '.join(names)}; choose one with --text-field)")
    yield from (t for t in table.column(column).to_pylist() if isinstance(t, str))


def _read_hf_dataset(spec: str, text_field: str | None) -> str:
    parts = spec.split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "test")
    try:
        import datasets
    except ImportError:
        raise UserError("hf: data sources need the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown dataset, bad split: all one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load dataset hf:{spec} ({first})") from None
    return "\n\n".join(_pick_field(row, text_field, f"hf:{spec}") for row in ds)


def shared_data_file(relative: str) -> str:
    """A file under the shared data folder beside the checkout (`../shared/data/<relative>`), or "" when absent.

    The UI uses it for default calibration / evaluation text (e.g. "wikitext-2-raw/wiki.test.raw").
    """
    candidate = Path(__file__).parents[1].parent / "shared" / "data" / relative
    return str(candidate) if candidate.is_file() else ""


@dataclass
class TokenBlocks:
    """Token ids cut into blocks, with where they came from.

    Attributes:
        ids: (n_blocks, seq_len) int64.
        source: the data source as given.
        fingerprint: sha256 of `ids` (see the module docstring).
        total_tokens: tokens in the whole text (before cutting).
    """

    ids: torch.Tensor
    source: str
    fingerprint: str
    total_tokens: int

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    @property
    def num_blocks(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    @property
    def num_targets(self) -> int:
        """Next-token targets: seq_len - 1 per block."""
        return self.num_blocks * (self.seq_len - 1)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive batches of blocks, in file order; the last one may be smaller."""
        for start in range(0, self.num_blocks, batch_size):
            yield self.ids[start : start + batch_size]

    def describe(self) -> dict:
        """What metric and score records store about the data."""
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "seq_len": self.seq_len,
            "blocks": self.num_blocks,
            "tokens": self.num_tokens,
        }


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """The whole text as one string, no special tokens -> 1-D int64 ids."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def cut_blocks(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive (n, seq_len) blocks of a 1-D id tensor: the first max_tokens // seq_len, or all full ones."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (got {seq_len})")
    n = ids.numel() // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n < 1:
        raise UserError(
            f"not enough tokens for one block: the data has {ids.numel()} tokens, --seq-len is {seq_len}"
            + (f" and --tokens is {max_tokens}" if max_tokens is not None else "")
        )
    return ids[: n * seq_len].view(n, seq_len)


def load_blocks(
    source: str | Path,
    tokenizer,
    seq_len: int,
    max_tokens: int | None = None,
    *,
    text_field: str | None = None,
) -> TokenBlocks:
    """Read, tokenize and cut a data source following the contract in the module docstring."""
    if tokenizer is None:
        raise UserError("the model has no tokenizer files: cannot tokenize text for it")
    ids = tokenize_text(read_text(source, text_field=text_field), tokenizer)
    blocks = cut_blocks(ids, seq_len, max_tokens)
    return TokenBlocks(blocks, str(source), tokens_fingerprint(blocks), ids.numel())
