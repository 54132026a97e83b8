"""The learning-rate schedules of distillation jobs (surgery.distill.loop.lr_at), checked against their
definitions."""

from __future__ import annotations

import math

import pytest

from surgery.distill.config import DistillConfig
from surgery.distill.loop import lr_at


def config(schedule: str, steps: int = 100, warmup: int = 3, lr: float = 1e-3):
    return DistillConfig(teacher="t", student="s", data="d.txt", steps=steps, lr=lr, warmup_steps=warmup,
                         schedule=schedule)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fifth():
    cfg = config("wsd")
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # warmup
    assert all(v == 1e-3 for v in lrs[3:81])  # stable: the peak until the last 20 steps begin
    assert lrs[80:] == pytest.approx([1e-3 * (100 - s) / 20 for s in range(80, 100)])  # linear decay
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    assert lrs[-1] == pytest.approx(1e-3 / 20)  # the last step still moves (as cosine's does)


def test_wsd_on_a_few_steps_decays_over_at_least_one():
    cfg = config("wsd", steps=3, warmup=0)
    assert [lr_at(cfg, s) for s in range(3)] == pytest.approx([1e-3, 1e-3, 1e-3])  # round(0.6) = 1 decay step
    cfg = config("wsd", steps=10, warmup=0)
    assert [lr_at(cfg, s) for s in range(10)] == pytest.approx([1e-3] * 8 + [1e-3, 5e-4])


def test_cosine_and_linear_unchanged():
    cfg = config("cosine", steps=10, warmup=0)
    assert [lr_at(cfg, s) for s in range(10)] == pytest.approx(
        [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)])
    cfg = config("linear", steps=10, warmup=2)
    assert [lr_at(cfg, s) for s in range(2, 10)] == pytest.approx([1e-3 * (1 - (s - 2) / 8) for s in range(2, 10)])
