"""Importance scoring: which heads, KV groups, neurons, layers and singular values matter, on calibration text.

Library use::

    from surgery.importance import score_source, save_scores, load_scores
    scores = score_source("smollm2-135m", "wiki.test.raw", "head-grad,neuron-taylor,layer-bi,sv-grad",
                          tokens=16384, seq_len=256, batch_size=8)
    save_scores("scores.safetensors", scores)

    # or on a model already in memory:
    from surgery.importance import score_model
    tensors = score_model(model, blocks.batches(8), "head-grad,sv-grad")

See docs/scoring.md for every metric's definition and the score file format.
"""

from surgery.importance.methods import ALIASES, METHODS, Method, parse_methods
from surgery.importance.pipeline import parse_autocast, score_source
from surgery.importance.runner import Cancelled, score_model
from surgery.importance.scorefile import ScoreFile, ScoreMeta, ScoreMismatch, load_scores, save_scores

__all__ = [
    "ALIASES",
    "METHODS",
    "Cancelled",
    "Method",
    "ScoreFile",
    "ScoreMeta",
    "ScoreMismatch",
    "load_scores",
    "parse_autocast",
    "parse_methods",
    "save_scores",
    "score_model",
    "score_source",
]
