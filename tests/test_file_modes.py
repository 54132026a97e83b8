"""Outputs follow the user's umask (issue 16): a temp-file-and-rename writer must not leave them 0600."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from surgery.filemode import current_umask, ordinary_mode
from surgery.importance import ScoreFile, ScoreMeta, save_scores
from surgery.pipeline import apply_to_source
from surgery.plan import parse_plan
from tiny_models import make_model


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_plans_manifests_weights_and_scores_are_group_readable_like_any_file(tmp_path, umask_002):
    assert current_umask() == 0o002 and ordinary_mode() == 0o664
    make_model("llama").save_pretrained(tmp_path / "tiny")
    plan = parse_plan({"version": 1, "steps": [{"op": "drop_layers", "layers": [1]}]})
    plan.save(tmp_path / "plan.json")
    apply_to_source(plan, tmp_path / "out", str(tmp_path / "tiny"))
    meta = ScoreMeta(methods=["head-grad"], model_source="tiny", library_version="test")
    save_scores(tmp_path / "s.safetensors", ScoreFile(meta, {"model.layers.0.self_attn/head_grad": torch.ones(4)}))
    files = [tmp_path / "plan.json", tmp_path / "s.safetensors"] + sorted((tmp_path / "out").iterdir())
    assert {f.name: oct(mode(f)) for f in files} == {f.name: oct(0o664) for f in files}
    assert mode(tmp_path / "out") == 0o775
