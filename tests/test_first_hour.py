"""A new user's first hour with the newer commands (score --layerwise, apply --dry-run, plan suggest --axes,
distill --nproc/--fsdp, export of width / expert cuts): each test pins one defect found by using them over a shell.

Bad input: one line on stderr, exit code 2, nothing written (no job directory, no output).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import call, one_error_line
from tiny_models import save_tiny

DATA = Path(__file__).parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WORKBENCH_JOBS", str(tmp_path / "jobs"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("student") / "tiny", seed=3)


def no_jobs(tmp_path) -> bool:
    jobs = tmp_path / "jobs"
    return not jobs.exists() or not any(jobs.iterdir())


def test_dry_run_of_a_pipeline_file_says_so(capsys, tmp_path, model_dir):
    pipeline = tmp_path / "pipeline.json"
    pipeline.write_text(json.dumps({"version": 1, "kind": "pipeline", "model": {"source": str(model_dir)},
                                    "stages": [{"stage": "prune", "steps": [{"op": "drop_mlp", "layer": 1}]}]}))
    code, _, err = call(capsys, "apply", "--dry-run", pipeline)
    assert code == 2, err
    assert "is a pipeline file: --dry-run lists the reads of a plan file only" in one_error_line(err)


def test_plan_validate_checks_a_pipeline_file_as_a_pipeline(capsys, tmp_path, model_dir):
    pipeline = tmp_path / "pipeline.json"
    doc = {"version": 1, "kind": "pipeline", "model": {"source": str(model_dir)},
           "stages": [{"stage": "prune", "steps": [{"op": "drop_mlp", "layer": 1}]}]}
    pipeline.write_text(json.dumps(doc))
    code, out, err = call(capsys, "plan", "validate", pipeline)
    assert code == 0, err  # it printed "kind: unknown field" and "stages: unknown field" (the plan schema's view)
    assert "valid pipeline: 1 stage(s) (prune)" in out, out
    doc["stages"][0]["stage"] = "bogus"
    pipeline.write_text(json.dumps(doc))
    code, out, err = call(capsys, "plan", "validate", pipeline)
    assert code == 2, err
    assert "unknown field" not in err and str(pipeline) in one_error_line(err), err


@pytest.mark.parametrize("axes", [[], ["--axes", "heads,neurons"]])
def test_suggest_a_target_no_cut_reaches_is_refused(capsys, tmp_path, model_dir, axes):
    scores = tmp_path / "s.safetensors"
    methods = ["--method", "head-grad,neuron-taylor", "--data", DATA, "--tokens", "256", "--seq-len", "64"] \
        if axes else ["--method", "head-magnitude,neuron-magnitude"]  # a mix needs first-order loss scores
    assert call(capsys, "score", model_dir, *methods, "--out", scores)[0] == 0
    code, _, err = call(capsys, "plan", "suggest", model_dir, "--scores", scores, "--target-params", "0.9999",
                        *axes, "--out", tmp_path / "plan.json")
    assert code == 2, err  # it wrote a plan of 0 steps ("removes nothing") and exited 0
    line = err.strip().splitlines()[-1]
    assert "the nearest plan removes nothing" in line and "ask for at most 0.99" in line, err
    assert not (tmp_path / "plan.json").exists()


def test_suggest_axes_refuses_a_kv_metric_it_would_ignore(capsys, tmp_path, model_dir):
    scores = tmp_path / "g.safetensors"
    assert call(capsys, "score", model_dir, "--method", "head-grad", "--data", DATA, "--tokens", "256",
                "--seq-len", "64", "--out", scores)[0] == 0
    code, _, err = call(capsys, "plan", "suggest", model_dir, "--scores", scores, "--target-params", "0.8",
                        "--axes", "heads", "--kv-metric", "kv-group-grad", "--out", tmp_path / "plan.json")
    assert code == 2, err  # it ran and named only head_grad: --kv-metric was dropped silently
    assert "drop --kv-metric" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "plan.json").exists()


def test_suggest_too_deep_a_cut_says_keep_more(capsys, tmp_path, model_dir):
    scores = tmp_path / "mag.safetensors"
    assert call(capsys, "score", model_dir, "--method", "head-magnitude,neuron-magnitude", "--out", scores)[0] == 0
    code, _, err = call(capsys, "plan", "suggest", model_dir, "--scores", scores, "--target-params", "0.01",
                        "--axes", "heads,neurons", "--out", tmp_path / "plan.json")
    assert code == 2, err
    line = err.strip().splitlines()[-1]  # after the "fingerprinting weights…" note
    # it used to say "lower the target" (keep even less) and "--layers", which --axes refuses
    assert "keep more (a higher --target-params" in line and "layers in --axes" in line, err
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--nproc", "0"], r"--nproc must be at least 1 \(got 0\)"),  # was ZeroDivisionError, exit 1
    (["--nproc", "2", "--device", "cuda:7"], "no such CUDA device|CUDA is not available"),  # job failed later
    (["--fsdp", "--device", "tpu"], "unknown device: 'tpu'"),
])
def test_distill_process_and_device_errors_come_before_a_job_exists(capsys, tmp_path, model_dir, student_dir,
                                                                    extra, expected):
    import re

    code, _, err = call(capsys, "distill", "--teacher", model_dir, "--student", student_dir, "--data", DATA,
                        "--steps", "2", "--seq-len", "32", "--batch-size", "2", *extra)
    assert code == 2, err
    assert re.search(expected, one_error_line(err)), err
    assert no_jobs(tmp_path)


def test_resume_with_zero_processes_is_one_line(capsys, tmp_path, model_dir, student_dir):
    code, out, err = call(capsys, "distill", "--teacher", model_dir, "--student", student_dir, "--data", DATA,
                          "--steps", "1", "--seq-len", "32", "--batch-size", "2", "--print-job")
    assert code == 0, err
    from surgery.jobs.store import create_job, jobs_root

    job = create_job(jobs_root(tmp_path / "jobs"), out)
    code, _, err = call(capsys, "jobs", "resume", job.id, "--nproc", "0")
    assert code == 2, err
    assert "--nproc must be at least 1" in one_error_line(err)


def test_data_that_is_a_device_a_directory_or_a_pipe_is_one_line(capsys, tmp_path, model_dir):
    import os

    read_end, write_end = os.pipe()
    os.write(write_end, b"some text " * 100)
    os.close(write_end)
    cases = {"/dev/zero": "not a regular file", str(tmp_path): "is a directory",
             f"/dev/fd/{read_end}": "is a pipe: write the text to a file first"}  # was "no such data file"
    for path, expected in cases.items():
        for argv in (["eval", model_dir, "--data", path], ["score", model_dir, "--data", path, "--out",
                                                           tmp_path / "s.safetensors"]):
            code, _, err = call(capsys, *argv)
            assert code == 2, (argv, err)
            assert expected in one_error_line(err), (argv, err)
    os.close(read_end)
    assert not (tmp_path / "s.safetensors").exists()


def test_gguf_export_without_the_suffix_is_refused(capsys, tmp_path, model_dir):
    # it used to write `model`, a file no workbench command (nor llama.cpp's tools by name) takes back as a source
    code, _, err = call(capsys, "export", model_dir, "--to", "gguf", "--out", tmp_path / "model")
    assert code == 2, err
    assert "ends in .gguf (e.g. " in one_error_line(err)
    assert not list(tmp_path.iterdir()) or all(p.name in ("cache", "jobs") for p in tmp_path.iterdir())
