"""The tokenizer inside a GGUF file, read from an HF tokenizer: llama.cpp's `gpt2` (byte-level BPE) or `llama`
(SentencePiece BPE) vocabulary.

What is written follows llama.cpp's own converter (convert_hf_to_gguf.py `get_vocab_base`,
`_set_vocab_sentencepiece`): one token string per id (ids the tokenizer lacks become unused `[PADi]` tokens up to the model's vocab size), a
type per token (control for special added tokens, user-defined for other added tokens; byte and unknown pieces for
SentencePiece), the BPE merges and the pre-tokenizer name (gpt2) or a score per piece and the space prefix
(llama), the special-token ids, whether BOS/EOS are added, and the chat template.

Three tokenizer kinds are supported: byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2), SentencePiece BPE (Llama 2,
Mistral, TinyLlama: spaces spelled "▁", byte fallback) and a character-level word-level vocabulary (every
non-special token one single-byte character, as the tiny test models use), written as a byte-level BPE whose
merges never fire. Anything else (Unigram, WordPiece, ...) is refused in one line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from surgery.errors import UserError

# a merge of two strings no byte-level BPE spells (U+0100 is byte 0's letter, never three in one token)
_NEVER_MERGE = "\u0100\u0100\u0100 \u0100\u0100\u0100"
# gguf.TokenType values (llama.cpp LLAMA_TOKEN_TYPE_*)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁": SentencePiece's space


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]  # gpt2 only
    pre: str  # llama.cpp pre-tokenizer name
    model: str = "gpt2"  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
    scores: list[float] | None = None  # llama: the merge priority of each token (higher merges first)
    add_space_prefix: bool | None = None  # llama: a "▁" before the text, as SentencePiece's dummy prefix
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos" / "eos" / "unk" / "pad" -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)  # what the runtime will do differently, for the report

    def write(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.model == "gpt2":
            writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        for kind, idx in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(idx)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE tokens are spelled in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _pre_tokenizer_name(spec: dict | None) -> str | None:
    """llama.cpp's name for the pre-tokenizer in tokenizer.json, when it is one llama.cpp reproduces exactly."""
    if spec is None:
        return None
    steps = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex", "")
        if pattern.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"):
            return "llama-bpe"
        if pattern.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"):
            return "qwen2"
    return None


def _steps(part: dict | None, key: str) -> list[dict]:
    if not part:
        return []
    return (part.get(key) or []) if part.get("type") == "Sequence" else [part]


def sentencepiece_spaces(spec: dict) -> tuple[bool, bool] | None:
    """(prepends a "▁", through a Metaspace pre-tokenizer) of a SentencePiece-style tokenizer.json, which spells
    spaces as "▁" (a normalizer Replace(" ", "▁") as Llama 2 / Mistral / TinyLlama ship, or a Metaspace
    pre-tokenizer as transformers 5 converts a tokenizer.model); None for any other tokenizer."""
    norms = _steps(spec.get("normalizer"), "normalizers")
    replaces = any(n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == " "
                   and n.get("content") == SPACE for n in norms)
    prepends = any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in norms)
    meta = [p for p in _steps(spec.get("pre_tokenizer"), "pretokenizers") if p.get("type") == "Metaspace"]
    if meta and meta[0].get("replacement", SPACE) == SPACE:
        scheme = meta[0].get("prepend_scheme") or ("always" if meta[0].get("add_prefix_space", True) else "never")
        return prepends or scheme != "never", True
    return (prepends, False) if replaces else None


def _merge_scores(merges: list[str], by_id: dict[int, str], special: set[int], vocab_size: int) -> list[float]:
    """Scores llama.cpp's SentencePiece tokenizer merges by (the highest-scoring adjacent pair whose concatenation
    is a token merges first), from the BPE merge ranks: a token made by merge r scores -r, as SentencePiece's own
    BPE scores are. Tokens no merge makes (characters, bytes, specials) are never a merge's result, so their
    score does not change any tokenisation: 0 for specials and bytes, below every merge for characters."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, r)
    scores = []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None or i in special or _is_byte(tok):
            scores.append(0.0)
        else:
            scores.append(-float(rank.get(tok, len(merges) + i)))
    return scores


def _merges(model: dict) -> list[str]:
    """A BPE model's merges as "left right" strings (tokenizer.json writes them as strings or as pairs)."""
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]


def _is_byte(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _special_ids(tokenizer: Any, config: dict) -> dict[str, int]:
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        idx = getattr(tokenizer, f"{kind}_token_id", None)
        if idx is None:
            idx = config.get(f"{kind}_token_id")
        if isinstance(idx, list):  # some configs list several EOS ids: llama.cpp takes one
            idx = idx[0] if idx else None
        if isinstance(idx, int) and idx >= 0:
            ids[kind] = idx
    return ids


def _adds(tokenizer: Any, idx: int | None, at_start: bool) -> bool:
    if idx is None:
        return False
    ids = tokenizer("a b").input_ids
    return bool(ids) and (ids[0] if at_start else ids[-1]) == idx


def vocab_from_tokenizer(tokenizer: Any, config: dict, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of an HF fast tokenizer, padded to the model's `vocab_size`.

    Raises:
        UserError: no tokenizer, or a kind llama.cpp's gpt2 / llama tokenizers cannot reproduce.
    """
    if tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
        raise UserError("GGUF export needs the model's tokenizer (a fast tokenizer, tokenizer.json) beside the weights")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    kind = model.get("type")
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size or max(by_id, default=0) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary has {vocab_size} rows")
    notes: list[str] = []
    spaces = sentencepiece_spaces(spec)
    if kind == "Unigram":
        raise UserError("GGUF export: Unigram SentencePiece tokenizers (T5 style) are not supported; llama.cpp's "
                        "llama tokenizer is SentencePiece BPE (supported: byte-level BPE, SentencePiece BPE, "
                        "character-level)")
    if kind == "BPE" and spaces is not None:
        return _sentencepiece_vocab(tokenizer, config, vocab_size, spec, by_id, added, spaces)
    if kind == "BPE":
        # llama.cpp refuses a gpt2 vocabulary without merges; a BPE without any is character-level
        merges = _merges(model) or [_NEVER_MERGE]
        spell = None
        pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
        if pre is None:
            pre = "default"
            notes.append("tokenizer: pre-tokenizer not one llama.cpp names; written as 'default' (llama.cpp may split "
                         "raw text differently from transformers; token ids given directly are unaffected)")
    elif kind == "WordLevel":
        plain = [t for i, t in by_id.items() if i not in added]
        if not all(len(t) == 1 and len(t.encode()) == 1 for t in plain):
            raise UserError("GGUF export supports byte-level BPE tokenizers and character-level vocabularies; "
                            "this word-level vocabulary has multi-character words")
        byte_chars = bytes_to_unicode()
        spell = lambda t: byte_chars[t.encode()[0]]  # noqa: E731 - one character spelled as byte-level BPE does
        specials = [t for i, t in sorted(by_id.items()) if i in added]
        # llama.cpp requires a merges list; a merge of two special tokens can never fire (BPE starts from characters)
        merges = [f"{specials[0]} {specials[1]}"] if len(specials) >= 2 else [_NEVER_MERGE]
        pre = "default"
    else:
        raise UserError(f"GGUF export supports byte-level BPE, SentencePiece BPE and character-level tokenizers, "
                        f"not {kind}")
    tokens, types = _token_table(vocab_size, by_id, added, spell)
    return _vocab(tokenizer, config, tokens=tokens, token_types=types, merges=merges, pre=pre, notes=notes)


def _token_table(vocab_size: int, by_id: dict[int, str], added: dict[int, dict], spell=None,
                 piece_type=lambda token: NORMAL) -> tuple[list[str], list[int]]:
    """(token strings, token types) for ids 0..vocab_size-1: `[PADi]` UNUSED where the tokenizer has no id,
    added tokens CONTROL (special) or USER_DEFINED, the rest `spell(token)` of type `piece_type(token)`."""
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(tok)
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(spell(tok) if spell else tok)
            types.append(piece_type(tok))
    return tokens, types


def _vocab(tokenizer: Any, config: dict, **fields) -> GGUFVocab:
    """A GGUFVocab with the special ids, add-BOS / add-EOS flags and chat template every kind carries."""
    special = _special_ids(tokenizer, config)
    template = getattr(tokenizer, "chat_template", None)
    return GGUFVocab(special_ids=special, add_bos=_adds(tokenizer, special.get("bos"), at_start=True),
                     add_eos=_adds(tokenizer, special.get("eos"), at_start=False),
                     chat_template=template if isinstance(template, str) else None, **fields)


def _sentencepiece_vocab(tokenizer: Any, config: dict, vocab_size: int, spec: dict, by_id: dict[int, str],
                         added: dict[int, dict], spaces: tuple[bool, bool]) -> GGUFVocab:
    """llama.cpp's `llama` (SentencePiece BPE) vocabulary, as convert_hf_to_gguf's `_set_vocab_sentencepiece`
    writes it: pieces as they are, a score per piece, types (byte-fallback `<0xXX>` pieces BYTE, the unknown
    token UNKNOWN, special added tokens CONTROL), no merges, and whether a "▁" is prepended."""
    prepend, metaspace = spaces
    merges = _merges(spec["model"])
    byte_fallback = bool(spec["model"].get("byte_fallback"))
    tokens, types = _token_table(vocab_size, by_id, added,
                                 piece_type=lambda tok: BYTE if byte_fallback and _is_byte(tok) else NORMAL)
    unk = _special_ids(tokenizer, config).get("unk")
    if unk is not None and unk < vocab_size:
        types[unk] = UNKNOWN  # an added special token in tokenizer.json; sentencepiece's own type for it
    notes = []
    if metaspace and prepend:
        notes.append("tokenizer: transformers' Metaspace adds no \u2581 before text that already starts with a "
                     "space, llama.cpp always adds one: raw text starting with a space tokenises differently "
                     "(token ids given directly are unaffected)")
    return _vocab(tokenizer, config, tokens=tokens, token_types=types, merges=[], pre="default", model="llama",
                  scores=_merge_scores(merges, by_id, set(added), vocab_size), add_space_prefix=prepend, notes=notes)
