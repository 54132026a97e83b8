"""Tiny random models of every supported family, built from configs (no downloads).

Weights use a large init std so that removing anything moves the logits visibly: an oracle test that compares
two near-constant outputs could not fail.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.3, max_position_embeddings=128)


def make_config(family: str, **overrides):
    if family == "llama":
        return LlamaConfig(**{**COMMON, "head_dim": 16, "tie_word_embeddings": True, **overrides})
    if family == "qwen2":
        return Qwen2Config(**COMMON, tie_word_embeddings=False)
    if family == "qwen3":
        return Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True)
    if family == "gemma3":
        return Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if family == "phi3":
        return Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_inner=96, n_positions=128,
                          initializer_range=0.3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    raise KeyError(family)


FAMILIES = ["llama", "qwen2", "qwen3", "gemma3", "phi3", "gpt2"]


def make_model(family: str, seed: int = 0, **overrides):
    """A fresh tiny model in eval mode; the same seed gives the same weights (`overrides`: Llama config fields)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, **overrides), attn_implementation="eager").eval()
    with torch.no_grad():
        # RMSNorm/LayerNorm weights start at 1 (or 0 for Gemma's 1+w): perturb them so norms are not no-ops.
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def tiny_tokenizer(shuffle_seed: int = 0):
    """A character-level fast tokenizer with < VOCAB ids (shuffled ids: same text, other tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(string.ascii_letters + string.digits + " .,;:'\"!?-()\n=@&$"))
    if shuffle_seed:
        random.Random(shuffle_seed).shuffle(chars)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny(path: Path, family: str = "llama", *, seed: int = 0, shuffle_seed: int = 0, vocab: int | None = None):
    """Write a tiny random model with a character tokenizer to `path`; returns the path."""
    if vocab is None:
        model = make_model(family, seed=seed)
    else:
        cfg = make_config(family)
        cfg.vocab_size = vocab
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tiny_tokenizer(shuffle_seed).save_pretrained(path)
    return path
