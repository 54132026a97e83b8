"""Seeded sampling of continuations, for on-policy distillation (the student samples) and sequence-level KD (the
teacher samples).

`sample_continuations` runs its own KV-cached loop instead of `model.generate`: the sampler draws from a
`torch.Generator` the caller seeds from (job seed, step, micro-batch, rank), so a resumed job samples exactly the
tokens the uninterrupted run sampled, whatever the global RNG state, and nothing in transformers' generation
config (top-k 50 by default, repetition penalties, stopping at EOS) changes what is drawn.
"""

from __future__ import annotations

import torch

_SAMPLE_SALT = 7_919  # keeps the sampling streams apart from the data-order permutations (loop.sample_indices)


def sampling_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator of one micro-batch's samples: a pure function of (seed, step, micro-batch, rank)."""
    mixed = ((seed * 1_000_003 + step) * 1_009 + micro) * 101 + rank
    return torch.Generator().manual_seed(mixed * _SAMPLE_SALT % (2**63 - 1))


def sample_continuations(model, prompts: torch.Tensor, new_tokens: int, generator: torch.Generator,
                         temperature: float = 1.0) -> torch.Tensor:
    """Extend each prompt by `new_tokens` tokens sampled from softmax(logits / temperature).

    Args:
        model: A causal LM (any mode; it runs in eval mode here and gets its mode back).
        prompts: (B, P) int64 token ids.
        new_tokens: Tokens to sample per row (>= 1).
        generator: CPU generator (see `sampling_generator`); sampling happens on CPU for the same stream on any
            device.
        temperature: > 0; 1.0 samples the model's own distribution.

    Returns:
        (B, P + new_tokens) int64, an ordinary tensor (not an inference tensor: it may feed a training forward).
    """
    from torch.distributed.fsdp import FSDPModule

    # an FSDP-sharded model samples under no_grad: its one-rank all-gather cannot fill inference tensors (torch 2.13)
    with torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode():
        ids = _sample(model, prompts, new_tokens, generator, temperature)
    return ids.clone()  # a clone outside inference mode is an ordinary tensor


def _sample(model, prompts, new_tokens, generator, temperature) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1]  # (B, V)
        pieces = [prompts]
        for i in range(new_tokens):
            probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)  # (B, V)
            token = torch.multinomial(probs, 1, generator=generator).to(prompts.device)  # (B, 1)
            pieces.append(token)
            if i + 1 < new_tokens:
                out = model(input_ids=token, cache=cache, use_cache=True)
                cache, logits = out.cache, out.logits[:, -1]
    finally:
        model.train(was_training)
    return torch.cat(pieces, dim=1)  # (B, P + new_tokens)
