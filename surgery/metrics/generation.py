"""A generation sample: the same prompts, greedy decoding, so outputs of several models can be read side by side.

Prompts are plain text (no chat template: the point is to see how a cut changes the same model's continuation,
not to chat). Each prompt is run alone, so no padding can change the result.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from surgery.errors import UserError
from surgery.metrics.common import ProgressFn, check_cancel, emit

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Here is a short list of fruits:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three most important things when training a neural network are",
    "Q: What is the boiling point of water at sea level?\nA:",
    "If you liked the movie Toy Story, you might also like",
    "Photosynthesis is the process by which",
)


@dataclass(frozen=True)
class Sample:
    """One prompt and the model's greedy continuation (the new text only)."""

    prompt: str
    completion: str


def pick_prompts(n: int, prompts: list[str] | None = None) -> list[str]:
    """The first `n` of `prompts` (default: DEFAULT_PROMPTS).

    Raises:
        UserError: n out of range.
    """
    pool = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    if not 1 <= n <= len(pool):
        raise UserError(f"--generate takes 1 to {len(pool)} prompts, got {n}")
    return pool[:n]


@torch.inference_mode()
def generate_samples(
    model,
    tokenizer,
    prompts: list[str],
    *,
    new_tokens: int = 32,
    progress: ProgressFn = None,
    cancel: threading.Event | None = None,
    label: str = "",
) -> list[Sample]:
    """Greedy continuations of `prompts`, one prompt at a time.

    Args:
        model: A causal LM in eval mode.
        tokenizer: Its tokenizer.
        prompts: Plain-text prompts.
        new_tokens: Tokens to generate per prompt (generation stops early at the end-of-sequence token).
        progress: Called with ProgressEvent("generation", done, total) after each prompt.
        cancel: Stop at the next prompt and raise Cancelled when set.
        label: The model's name for progress events.

    Raises:
        UserError: No tokenizer, or new_tokens < 1.
        Cancelled: `cancel` was set.
    """
    if tokenizer is None:
        raise UserError("the model has no tokenizer files: cannot generate text")
    if new_tokens < 1:
        raise UserError(f"--gen-tokens must be at least 1, got {new_tokens}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = []
    emit(progress, "generation", 0, len(prompts), model=label)
    for i, prompt in enumerate(prompts):
        check_cancel(cancel)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)  # (1, P)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )  # (1, P + new)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        samples.append(Sample(prompt, text))
        emit(progress, "generation", i + 1, len(prompts), model=label)
    return samples
