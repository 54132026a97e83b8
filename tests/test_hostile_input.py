"""Hostile and careless input (issue 15): each test pins one defect of the bad-input campaign.

The README's promise is checked every time: bad input gives one line on stderr, exit code 2, and writes nothing.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import call, one_error_line
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny

from surgery.errors import SourceError
from surgery.fingerprint import weights_fingerprint
from surgery.sources import resolve_source


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny")


def write_plan(tmp_path, steps=({"op": "drop_mlp", "layer": 1},), name="plan.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"version": 1, "steps": list(steps)}))
    return path


def sharded_copy(model_dir, target, shard_name):
    """A copy of `model_dir` whose index sends every tensor to `shard_name` (relative to the copy)."""
    target.mkdir()
    shutil.copy(model_dir / "config.json", target)
    keys = load_file(model_dir / "model.safetensors").keys()
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: shard_name for k in keys}}))
    return target


# ------------------------------------------------------------------------------------------------- item 1 ----


def test_shard_index_pointing_outside_the_model_dir_is_refused(capsys, tmp_path, model_dir):
    other = save_tiny(tmp_path / "other", seed=5)
    evil = sharded_copy(model_dir, tmp_path / "evil", "../other/model.safetensors")
    shutil.copy(model_dir / "model.safetensors", evil / "decoy.safetensors")  # what the fingerprint used to hash
    capsys.readouterr()
    code, _, err = call(capsys, "apply", write_plan(tmp_path), "--model", evil, "--out", tmp_path / "out")
    assert code == 2, err
    assert "outside the model directory" in one_error_line(err)
    assert not (tmp_path / "out").exists()
    assert other.is_dir()


def test_pickled_shard_in_a_safetensors_index_needs_allow_pickle(capsys, tmp_path, model_dir):
    evil = sharded_copy(model_dir, tmp_path / "evilbin", "w.bin")
    torch.save(load_file(model_dir / "model.safetensors"), evil / "w.bin")
    code, _, err = call(capsys, "apply", write_plan(tmp_path), "--model", evil, "--out", tmp_path / "out")
    assert code == 2, err
    assert "--allow-pickle" in one_error_line(err)
    assert not (tmp_path / "out").exists()
    assert resolve_source(str(evil), allow_pickle=True).path == evil  # the user may opt in


def test_fingerprint_covers_every_shard_the_index_names(tmp_path, model_dir):
    d = sharded_copy(model_dir, tmp_path / "nested", "sub/model.safetensors")
    (d / "sub").mkdir()
    state = load_file(model_dir / "model.safetensors")
    save_file(state, d / "sub" / "model.safetensors")
    resolve_source(str(d))  # a shard inside the directory is fine
    before = weights_fingerprint(d)
    first = next(iter(state))
    state[first] = state[first] + 1
    save_file(state, d / "sub" / "model.safetensors")
    assert weights_fingerprint(d) != before


def test_absolute_shard_path_is_refused(tmp_path, model_dir):
    d = sharded_copy(model_dir, tmp_path / "abs", str(model_dir / "model.safetensors"))
    with pytest.raises(SourceError, match="outside the model directory"):
        resolve_source(str(d))
