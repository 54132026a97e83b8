"""Synthetic interaction data for the recommendation tests (imported by tests/test_rec_models.py and
tests/test_dllm2rec.py)."""

from __future__ import annotations

import random
from pathlib import Path


def write_cycle_ratings(root: Path, *, seed: int, users: int = 48, items: int = 20, lengths: tuple[int, int] = (7, 14),
                        ratings: tuple[int, ...] = (4, 5)) -> Path:
    """A ratings.csv where each user walks the item catalogue in a fixed cycle from a random start: easy to learn,
    cheap to train. Returns `root`."""
    rng = random.Random(seed)
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(users):
        start = rng.randrange(items)
        for t in range(rng.randint(*lengths)):
            lines.append(f"{u},{(start + t) % items},{rng.choice(ratings)},{1000 + t}")
    (root / "ratings.csv").write_text("\n".join(lines) + "\n")
    return root
