"""The distillation recipes beyond logit KD on data, end to end on tiny models: on-policy (GKD), sequence-level KD,
cached teacher logits, cross-tokenizer ULD; each resumable bit for bit after SIGKILL; bad input exits 2."""

from __future__ import annotations

import json
import shutil
import string

import pytest
import torch

from surgery.distill.loop import is_on_policy_step
from surgery.jobs.status import job_status
from surgery.jobs.store import list_jobs
from surgery.jobs.worker import run_job
from cli_helpers import call, one_error_line
from test_jobs import (  # noqa: F401 (fixtures)
    assert_same_weights, env, events_of, kill_after_first_checkpoint, new_job, one_thread, output_tensors,
)
from tiny_models import make_model


def fused_char_tokenizer():
    """The char tokenizer of test_jobs (same ids), decoding without spaces between tokens (text round-trips)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def bpe_tokenizer(text: str, vocab_size: int = 120):
    """A BPE tokenizer trained on `text` (merged pieces, another vocabulary than the char tokenizer's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>"], show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module")
def xenv(env):
    """A student whose text round-trips (fused char tokenizer) and a teacher with a BPE vocabulary."""
    from surgery.loading import load_model

    text = (env / "data.txt").read_text()
    student = load_model(str(env / "student")).model
    from surgery.export import save_model_dir

    save_model_dir(student, env / "x-student", tokenizer=fused_char_tokenizer(), overwrite=True)
    teacher = make_model("llama", seed=5)
    teacher.save_pretrained(env / "x-teacher")
    bpe_tokenizer(text).save_pretrained(env / "x-teacher")
    return env


# ---------------------------------------------------------------- pure pieces


def test_on_policy_steps_are_the_requested_fraction_spread_evenly():
    for fraction, n in ((0.5, 10), (0.25, 8), (0.3, 10), (1.0, 5)):
        chosen = [s for s in range(n) if is_on_policy_step(s, fraction)]
        assert len(chosen) == int(n * fraction + 1e-9), (fraction, chosen)
    assert [s for s in range(6) if is_on_policy_step(s, 0.5)] == [1, 3, 5]
    assert not any(is_on_policy_step(s, 0.0) for s in range(20))


def test_sampling_is_seeded_per_step_and_masks_cover_the_samples():
    from surgery.distill.generate import sample_continuations, sampling_generator
    from surgery.distill.loop import MicroBatch

    model = make_model("llama", seed=0).train()
    prompts = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    a = sample_continuations(model, prompts, 5, sampling_generator(7, 3, 0, 0))
    b = sample_continuations(model, prompts, 5, sampling_generator(7, 3, 0, 0))
    c = sample_continuations(model, prompts, 5, sampling_generator(7, 4, 0, 0))
    assert a.shape == (2, 11) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :6], prompts) and not a.is_inference() and model.training
    pred, target = MicroBatch(a, torch.tensor([0, 1]), "student", 6).masks()
    assert pred[0].tolist() == [False] * 5 + [True] * 5 + [False]  # positions 5..9 predict tokens 6..10
    assert target[0].tolist() == [False] * 6 + [True] * 5


def test_alignment_pairs_positions_that_read_the_same_text(xenv):
    from surgery.distill.crosstok import align_batch
    from surgery.loading import load_tokenizer

    s_tok, t_tok = load_tokenizer(xenv / "x-student"), load_tokenizer(xenv / "x-teacher")
    text = "First Citizen: Before we proceed any further, hear me speak."
    ids = torch.tensor([s_tok(text, add_special_tokens=False)["input_ids"]])
    aligned = align_batch(ids, s_tok, t_tok, pad_id=t_tok.pad_token_id)
    t_ids = aligned.teacher_ids[0][aligned.attention_mask[0].bool()].tolist()
    assert t_ids == t_tok(text, add_special_tokens=False)["input_ids"] and len(t_ids) < ids.shape[1]
    # every BPE boundary is a char boundary: all teacher positions pair (but a leading metaspace piece, which
    # ends before the first character)
    assert len(aligned.rows) >= len(t_ids) - 1
    for i, j in zip(aligned.student_pos.tolist(), aligned.teacher_pos.tolist()):
        assert s_tok.decode(ids[0, : i + 1].tolist()) == t_tok.decode(t_ids[: j + 1]).lstrip(), (i, j)


# ---------------------------------------------------------------- on-policy and sequence-level KD


def test_on_policy_and_seq_kd_steps_log_their_source_and_train(tmp_path, env):
    job = new_job(tmp_path, env, steps=4, losses={"jsd": 1.0, "ce": 0.5}, jsd_beta=0.3, on_policy=0.5,
                  seq_kd=True, gen_tokens=8)
    assert run_job(job.path) == 0, events_of(job)[-1]
    steps = [e for e in events_of(job) if e["event"] == "step"]
    assert [e["source"] for e in steps] == ["teacher", "student", "teacher", "student"]
    assert set(steps[0]["losses"]) == {"jsd", "ce", "total"}  # seq-kd: hard labels on the teacher's samples
    assert set(steps[1]["losses"]) == {"jsd", "total"}  # on-policy: the student's samples are no labels
    before, after = output_tensors(env / "student"), output_tensors(job.default_output)
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- cached teacher logits


def test_teacher_cache_runs_without_the_teacher_byte_for_byte(capsys, tmp_path, env):
    teacher = tmp_path / "teacher"
    shutil.copytree(env / "teacher", teacher)
    cache = tmp_path / "cache"
    over = dict(teacher=str(teacher), teacher_cache=str(cache), top_k=8, losses={"kl": 1.0, "ce": 0.1}, steps=4)
    first = new_job(tmp_path / "a", env, **over)
    assert run_job(first.path) == 0, events_of(first)[-1]
    start = next(e for e in events_of(first) if e["event"] == "start")
    assert start["teacher_cache"]["bytes_per_token"] == 8 * (4 + 4)  # float32 log-prob + int32 id per kept token
    manifest = json.loads((cache / "cache.json").read_text())
    assert manifest["key"]["k"] == 8 and manifest["key"]["data_fingerprint"] == start["train"]["fingerprint"]

    # the same top-k loss with a live teacher, up to float rounding
    live = new_job(tmp_path / "live", env, **{**over, "teacher_cache": None})
    assert run_job(live.path) == 0
    first_kl = [e["losses"]["kl"] for e in events_of(first) if e["event"] == "step"]
    live_kl = [e["losses"]["kl"] for e in events_of(live) if e["event"] == "step"]
    assert first_kl == pytest.approx(live_kl, rel=1e-4)

    teacher.rename(tmp_path / "teacher-elsewhere")  # a machine without the teacher
    second = new_job(tmp_path / "b", env, **over)
    assert run_job(second.path) == 0, events_of(second)[-1]
    assert not any(e.get("message") == "loading teacher" for e in events_of(second))
    for name in ("model.safetensors",):
        assert (first.default_output / name).read_bytes() == (second.default_output / name).read_bytes()
    (tmp_path / "teacher-elsewhere").rename(teacher)

    base = ["distill", "--teacher", teacher, "--student", env / "student", "--data", env / "data.txt",
            "--teacher-cache", cache, "--seq-len", 24, "--jobs-dir", tmp_path / "c", "--device", "cpu"]
    code, _, err = call(capsys, *base, "--top-k", 4)
    assert code == 2 and "top 8" in one_error_line(err)
    code, _, err = call(capsys, *base, "--top-k", 8, "--max-tokens", 240)
    assert code == 2 and "other training tokens" in one_error_line(err)
    code, _, err = call(capsys, *base[:2], env / "student", *base[3:], "--top-k", 8)
    assert code == 2 and "another teacher" in one_error_line(err)
    code, _, err = call(capsys, *base)
    assert code == 2 and "top_k" in one_error_line(err)
    assert list_jobs(tmp_path / "c") == [] and json.loads((cache / "cache.json").read_text()) == manifest


# ---------------------------------------------------------------- cross-tokenizer


def test_uld_distils_from_a_teacher_with_another_tokenizer(capsys, tmp_path, xenv):
    base = ["distill", "--teacher", xenv / "x-teacher", "--student", xenv / "x-student", "--data",
            xenv / "data.txt", "--steps", 2, "--seq-len", 24, "--batch-size", 2, "--jobs-dir", tmp_path / "jobs",
            "--device", "cpu", "--foreground"]
    code, _, err = call(capsys, *base, "--loss", "kl:1.0")
    assert code == 2 and "uld" in one_error_line(err) and list_jobs(tmp_path / "jobs") == []
    code, _, err = call(capsys, *base, "--loss", "uld:1.0,ce:0.1")
    assert code == 0, err
    (job,) = list_jobs(tmp_path / "jobs")
    steps = [e for e in events_of(job) if e["event"] == "step"]
    assert len(steps) == 2 and set(steps[0]["losses"]) == {"uld", "ce", "total"} and steps[0]["losses"]["uld"] > 0


# ---------------------------------------------------------------- SIGKILL + resume, bad input


@pytest.mark.parametrize("recipe", ["on-policy+seq-kd", "teacher-cache", "uld"])
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path, env, xenv, recipe):
    over = {"on-policy+seq-kd": dict(losses={"jsd": 1.0, "ce": 0.1}, jsd_beta=0.7, on_policy=0.5, seq_kd=True,
                                     gen_tokens=6),
            "teacher-cache": dict(losses={"kl": 1.0, "ce": 0.1}, top_k=8, teacher_cache=str(tmp_path / "cache")),
            "uld": dict(losses={"uld": 1.0, "ce": 0.1}, teacher=str(xenv / "x-teacher"),
                        student=str(xenv / "x-student"))}[recipe]
    over.update(steps=60, checkpoint_every=3)
    reference = new_job(tmp_path / "a", env, **over)
    assert run_job(reference.path) == 0, events_of(reference)[-1]
    job = new_job(tmp_path / "b", env, **over)
    kill_after_first_checkpoint(job)
    assert job_status(job).state == "lost"
    assert run_job(job.path) == 0
    assert [e for e in events_of(job) if e["event"] == "start"][-1]["resumed_from"] is not None
    assert_same_weights(reference.default_output, job.default_output)


@pytest.mark.parametrize("flags, message", [
    (["--on-policy", "1.5"], "on_policy"),
    (["--on-policy", "-0.1"], "on_policy"),
    (["--loss", "jsd:1.0", "--jsd-beta", "1.01"], "jsd_beta"),
    (["--loss", "kl:nan"], "finite"),
    (["--loss", "kl:inf"], "finite"),
    (["--lr", "nan"], "lr"),
    (["--on-policy", "0.5", "--gen-tokens", "8", "--loss", "ce:1"], "teacher loss"),
    (["--seq-kd", "--gen-tokens", "24"], "gen_tokens"),
])
def test_bad_recipe_values_exit_2_and_create_nothing(capsys, tmp_path, env, flags, message):
    code, _, err = call(capsys, "distill", "--teacher", env / "teacher", "--student", env / "student", "--data",
                        env / "data.txt", "--seq-len", 24, "--jobs-dir", tmp_path / "jobs", *flags)
    assert code == 2 and message in one_error_line(err)
    assert not (tmp_path / "jobs").exists() or list_jobs(tmp_path / "jobs") == []


# ---------------------------------------------------------------- the whole recipe in one command


def test_compress_scores_cuts_reconstructs_redistils_and_records_each_stage(capsys, tmp_path, env):
    out = tmp_path / "compressed"
    base = ["compress", env / "teacher", "--target-params", 0.8, "--data", env / "data.txt", "--seq-len", 24,
            "--batch-size", 2, "--calib-tokens", 960, "--calib-seq-len", 48, "--recon-tokens", 720,
            "--recon-seq-len", 36, "--eval-data", env / "data.txt",
            "--eval-tokens", 240, "--eval-seq-len", 24, "--jobs-dir", tmp_path / "jobs"]
    code, _, err = call(capsys, *base, "--tokens", 10, "--out", out)
    assert code == 2 and "less than one redistillation step" in one_error_line(err)
    assert not out.exists() and not any((tmp_path / "jobs").glob("*"))
    code, _, err = call(capsys, *base, "--tokens", 144, "--schedule", "cosin", "--out", out)
    assert code == 2 and "--schedule cosin: one of constant, linear, cosine, wsd" in one_error_line(err)
    assert not out.exists() and not any((tmp_path / "jobs").glob("*"))

    code, stdout, err = call(capsys, *base, "--tokens", 144, "--out", out, "--json", "--schedule", "wsd",
                             "--temperature", 1.0)
    assert code == 0, err
    record = json.loads((out / "pipeline.json").read_text())
    assert json.loads(stdout) == record
    assert [s["stage"] for s in record["stages"]] == ["prune", "redistill"]
    before = record["metrics"]["before"]
    cut, final = record["stages"][0]["after"], record["stages"][1]["after"]
    assert 0.75 < cut["params"] / before["params"] < 0.85 and final["params"] == cut["params"]
    # a random tiny teacher: no quality ordering to expect, but each stage is measured on the same tokens
    assert before["eval_data"]["fingerprint"] == cut["eval_data"]["fingerprint"] == final["eval_data"]["fingerprint"]
    assert len({before["perplexity"], cut["perplexity"], final["perplexity"]}) == 3
    assert all(s["wall_s"] >= 0 for s in record["stages"])
    assert record["stages"][1]["tokens"] == (144 // 48) * 48 and record["stages"][1]["tokens_per_s"] > 0
    assert "tokens" not in record["stages"][0]
    assert record["prelude"]["score"]["tokens"] == 960 and record["prelude"]["suggest"]["reconstruct"]
    pipeline = record["pipeline"]
    assert pipeline["stages"][0]["steps"][-1]["op"] == "reconstruct"
    calibration = pipeline["stages"][0]["calibration"]
    assert (calibration["tokens"], calibration["seq_len"]) == (720, 36)  # --recon-*, not the scoring's --calib-*
    assert pipeline["stages"][1]["job"]["steps"] == 144 // 48
    assert pipeline["stages"][1]["job"]["schedule"] == "wsd" and pipeline["stages"][1]["job"]["temperature"] == 1.0
    # the generated pipeline replays byte for byte
    replay_file = tmp_path / "replay.json"
    replay_file.write_text(json.dumps(pipeline))
    code, _, err = call(capsys, "jobs", "pipeline", replay_file, "--out", tmp_path / "replay",
                        "--jobs-dir", tmp_path / "jobs2")
    assert code == 0, err
    for f in out.glob("*.safetensors"):
        assert (tmp_path / "replay" / f.name).read_bytes() == f.read_bytes()
