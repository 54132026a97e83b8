"""The CLI: happy paths on a tiny model directory, and bad input -> one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cli_helpers import call, one_error_line
from tiny_models import make_model, tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_model("llama").save_pretrained(path)
    return path


def write_plan(tmp_path, steps, model=None, name="plan.json"):
    doc = {"version": 1, "steps": steps}
    if model is not None:
        doc["model"] = model
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


UNIFORM = [{"op": "prune_heads", "layer": i, "heads": [1, 3]} for i in range(3)]


def test_inspect_json_reads_headers(capsys, model_dir):
    code, out, _ = call(capsys, "inspect", model_dir, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["num_layers"] == 3 and report["layers"][0]["heads"] == 4
    assert report["params_total"] == sum(p.numel() for p in make_model("llama").parameters())


def test_inspect_table(capsys, model_dir):
    code, out, _ = call(capsys, "inspect", model_dir)
    assert code == 0 and "q/kv" in out and "4/2" in out


def test_validate_then_apply_uniform_plan_loads_with_plain_transformers(capsys, tmp_path, model_dir):
    plan = write_plan(tmp_path, UNIFORM)
    code, out, err = call(capsys, "plan", "validate", plan, "--model", model_dir, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["params_after"] < summary["params_before"]
    out_dir = tmp_path / "pruned"
    code, out, err = call(capsys, "apply", plan, "--model", model_dir, "--out", out_dir, "--json")
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["output"]["loadable_with"] == "transformers"
    assert manifest["params"]["after"] == summary["params_after"]
    on_disk = json.loads((out_dir / "surgery.json").read_text())
    assert on_disk["input"]["fingerprint"] == summary["fingerprint"]
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)
    assert reloaded.config.num_attention_heads == 2
    with torch.no_grad():
        assert reloaded(tokens()).logits.shape == (2, 12, 128)


def test_plan_fingerprint_is_enforced_unless_forced(capsys, tmp_path, model_dir):
    plan = write_plan(tmp_path, UNIFORM, model={"source": str(model_dir), "fingerprint": "sha256:" + "0" * 64})
    code, _, err = call(capsys, "apply", plan, "--out", tmp_path / "out")
    assert code == 2 and "the plan was made for weights sha256:0000" in one_error_line(err)
    assert not (tmp_path / "out").exists()
    code, _, err = call(capsys, "apply", plan, "--out", tmp_path / "out", "--force")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "surgery.json").read_text())["forced"] is True


BAD_PLANS = {
    "malformed": ('{"version": 1, "steps": [', "malformed JSON at line 1"),
    "unknown_op": ({"version": 1, "steps": [{"op": "prune_everything"}]}, "unknown op 'prune_everything'"),
    "unknown_field": ({"version": 1, "steps": [{"op": "drop_mlp", "layer": 0, "layr": 1}]}, "layr: unknown field"),
    "out_of_range": ({"version": 1, "steps": [{"op": "prune_heads", "layer": 1, "heads": [7]}]},
                     "steps[0].heads: query head 7 out of range (layer 1 has 4 query heads)"),
    "gqa": ({"version": 1, "steps": [{"op": "prune_heads", "layer": 0, "heads": [0]}]}, "breaks the GQA rule"),
    "empty_layer": ({"version": 1, "steps": [{"op": "prune_kv_groups", "layer": 2, "groups": [0, 1]}]},
                    "use drop_attention instead"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_bad_plan_gives_one_line_exit_2_and_writes_nothing(capsys, tmp_path, model_dir, case):
    content, expected = BAD_PLANS[case]
    plan = tmp_path / "plan.json"
    plan.write_text(content if isinstance(content, str) else json.dumps(content))
    for argv in (["plan", "validate", plan, "--model", model_dir],
                 ["apply", plan, "--model", model_dir, "--out", tmp_path / "out"]):
        code, out, err = call(capsys, *argv)
        assert code == 2
        assert expected in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_several_problems_are_all_listed(capsys, tmp_path, model_dir):
    plan = write_plan(tmp_path, [{"op": "prune_heads", "layer": 9, "heads": [0]},
                                 {"op": "prune_neurons", "layer": 0, "neurons": [500]}])
    code, _, err = call(capsys, "plan", "validate", plan, "--model", model_dir)
    assert code == 2
    assert len(err.strip().splitlines()) == 2


def test_missing_model_path(capsys, tmp_path):
    plan = write_plan(tmp_path, [])
    code, _, err = call(capsys, "apply", plan, "--model", tmp_path / "nope", "--out", tmp_path / "out")
    assert code == 2 and "no such file or directory" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_plan_without_model_needs_model_flag(capsys, tmp_path):
    code, _, err = call(capsys, "plan", "validate", write_plan(tmp_path, []))
    assert code == 2 and "--model" in one_error_line(err)


def test_missing_plan_file(capsys, tmp_path, model_dir):
    code, _, err = call(capsys, "apply", tmp_path / "none.json", "--model", model_dir, "--out", tmp_path / "o")
    assert code == 2 and "no such plan file" in one_error_line(err)


def test_output_that_cannot_be_written(capsys, tmp_path, model_dir):
    (tmp_path / "afile").write_text("x")
    code, _, err = call(capsys, "apply", write_plan(tmp_path, UNIFORM), "--model", model_dir,
                        "--out", tmp_path / "afile" / "out")
    assert code == 2 and "is not a directory" in one_error_line(err)


def test_nonempty_output_is_kept(capsys, tmp_path, model_dir):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "mine.txt").write_text("keep")
    code, _, err = call(capsys, "apply", write_plan(tmp_path, UNIFORM), "--model", model_dir, "--out", out_dir)
    assert code == 2 and "--overwrite" in one_error_line(err)
    assert [p.name for p in out_dir.iterdir()] == ["mine.txt"]


def test_corrupt_safetensors_is_one_line(capsys, tmp_path, model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    data = (model_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    for argv in (["inspect", broken], ["apply", write_plan(tmp_path, UNIFORM), "--model", broken,
                                       "--out", tmp_path / "out"]):
        code, _, err = call(capsys, *argv)
        assert code == 2, err
        one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_is_one_line(capsys, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 20)
    code, _, err = call(capsys, "inspect", path)
    assert code == 2 and "corrupt gguf header" in one_error_line(err).lower()


def test_unsupported_family_lists_supported(capsys, tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (d / "model.safetensors").write_bytes(b"")
    code, _, err = call(capsys, "inspect", d)
    assert code == 2 and "supported: " in one_error_line(err) and "llama" in err


def test_internal_error_exits_1_without_traceback(capsys, monkeypatch, tmp_path, model_dir):
    def boom(*a, **k):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr("surgery.inspect.inspect_model", boom)
    code, _, err = call(capsys, "inspect", model_dir)
    assert code == 1 and err.startswith("internal error: ZeroDivisionError: bug") and "Traceback" not in err


def test_plan_schema_matches_published_docs(capsys):
    from pathlib import Path

    code, out, _ = call(capsys, "plan", "schema")
    assert code == 0
    published = Path(__file__).parents[1] / "docs" / "plan.schema.json"
    assert json.loads(out) == json.loads(published.read_text())


def test_long_steps_leave_one_line_off_a_terminal_and_quick_ones_none(capsys, monkeypatch):
    import time

    from workbench import cli_common

    monkeypatch.setattr(cli_common, "NOTE_AFTER_S", 0.05)
    with cli_common.status(True) as say:
        say("fingerprinting weights")  # replaced at once: no line
        say("converting demo.gguf to a safetensors directory (once)")
        time.sleep(0.4)
    time.sleep(0.1)
    assert capsys.readouterr().err.splitlines() == ["converting demo.gguf to a safetensors directory (once)…"]


def test_tui_scoring_status_has_rate_and_eta_per_phase():
    from workbench.app import phase_progress

    line = phase_progress({"name": "singular values", "unit": "matrices", "start": 0.0}, 40, 210, now=20.0)
    assert line == "singular values: 40/210 matrices · 2/s · ETA 1:25"
