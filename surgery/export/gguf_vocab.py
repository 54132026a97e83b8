"""The tokenizer inside a GGUF file: llama.cpp's `gpt2` (byte-level BPE) vocabulary, read from an HF tokenizer.

What is written follows llama.cpp's own converter (convert_hf_to_gguf.py `get_vocab_base`): one token string per
id (ids the tokenizer lacks become unused `[PADi]` tokens up to the model's vocab size), a type per token (control
for special added tokens, user-defined for other added tokens), the BPE merges, the pre-tokenizer name, the
special-token ids, whether BOS/EOS are added, and the chat template.

Two tokenizer kinds are supported: byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2) and a character-level word-level
vocabulary (every non-special token one single-byte character, as the tiny test models use), written as a
byte-level BPE whose merges never fire. Anything else is refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from surgery.errors import UserError

# gguf.TokenType values (llama.cpp LLAMA_TOKEN_TYPE_*)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str  # llama.cpp pre-tokenizer name
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos" / "eos" / "unk" / "pad" -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)  # what the runtime will do differently, for the report

    def write(self, writer: Any) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
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
        UserError: no tokenizer, or a kind llama.cpp's gpt2 tokenizer cannot reproduce.
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
    if kind == "BPE":
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
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
        merges = [f"{specials[0]} {specials[1]}"] if len(specials) >= 2 else ["\u0100\u0100\u0100 \u0100\u0100\u0100"]
        pre = "default"
    else:
        raise UserError(f"GGUF export supports byte-level BPE tokenizers (and character-level vocabularies), not {kind}")
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
            types.append(NORMAL)
    special = _special_ids(tokenizer, config)
    template = getattr(tokenizer, "chat_template", None)
    return GGUFVocab(
        tokens=tokens,
        token_types=types,
        merges=merges,
        pre=pre,
        special_ids=special,
        add_bos=_adds(tokenizer, special.get("bos"), at_start=True),
        add_eos=_adds(tokenizer, special.get("eos"), at_start=False),
        chat_template=template if isinstance(template, str) else None,
        notes=notes,
    )
