"""Hostile and careless input (issue 15): each test pins one defect of the bad-input campaign.

The README's promise is checked every time: bad input gives one line on stderr, exit code 2, and writes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import call, one_error_line
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny

from surgery.errors import SourceError, UserError
from surgery.fingerprint import weights_fingerprint
from surgery.loading import load_model
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


# ------------------------------------------------------------------------------------------ items 2, 9, 12 ----

def test_apply_refuses_an_output_another_process_is_writing(capsys, tmp_path, model_dir):
    from surgery.export.atomic import output_lock

    out = tmp_path / "out"
    with output_lock(out):  # flock: a second open file description conflicts, even in this process
        code, _, err = call(capsys, "apply", write_plan(tmp_path), "--model", model_dir, "--out", out)
    assert code == 2, err
    assert "another process is writing" in one_error_line(err)
    assert not out.exists()


def test_an_output_finished_by_another_run_meanwhile_is_not_replaced(capsys, tmp_path, model_dir, monkeypatch):
    import surgery.export.atomic as atomic

    out, real_lock = tmp_path / "out", atomic.output_lock

    def other_run_finishes_first(path):
        out.mkdir()
        (out / "theirs.txt").write_text("the other run's output")
        return real_lock(path)

    monkeypatch.setattr(atomic, "output_lock", other_run_finishes_first)
    code, _, err = call(capsys, "apply", write_plan(tmp_path), "--model", model_dir, "--out", out)
    assert code == 2, err
    assert "not empty" in one_error_line(err)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out", "plan.json"]  # no lock or temp left


def test_source_is_never_an_output(capsys, tmp_path, model_dir):
    src = tmp_path / "src"
    shutil.copytree(model_dir, src)
    before = sorted(p.name for p in src.iterdir())
    for out in (src, tmp_path):
        code, _, err = call(capsys, "apply", write_plan(tmp_path), "--model", src, "--out", out, "--overwrite")
        assert code == 2, err
        assert "source model" in one_error_line(err)
    assert sorted(p.name for p in src.iterdir()) == before


@pytest.mark.parametrize("out", [".", ".."])
def test_current_directory_or_above_is_never_an_output(capsys, tmp_path, model_dir, monkeypatch, out):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = call(capsys, "apply", write_plan(tmp_path), "--model", model_dir, "--out", out, "--overwrite")
    assert code == 2, err
    assert "current directory" in one_error_line(err)
    assert work.is_dir() and (tmp_path / "plan.json").is_file()


def test_symlinked_output_is_refused(capsys, tmp_path, model_dir):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for out in ("dangling", "link"):
        code, _, err = call(capsys, "apply", write_plan(tmp_path), "--model", model_dir,
                            "--out", tmp_path / out, "--overwrite")
        assert code == 2, err
        assert "symbolic link" in one_error_line(err)
    assert not list(tmp_path.glob(".*"))


def test_a_240_character_output_name_works(capsys, tmp_path, model_dir):
    out = tmp_path / ("x" * 240)
    for _ in range(2):  # the second run swaps an existing output: its hidden names must fit too
        code, _, err = call(capsys, "apply", write_plan(tmp_path), "--model", model_dir, "--out", out, "--overwrite")
        assert code == 0, err
    assert (out / "surgery.json").is_file()
    assert not list(tmp_path.glob(".*"))


def write_output(out, label, *, overwrite=True):
    import surgery.export.atomic as atomic

    with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "label.txt").write_text(label)
        (tmp / "more.txt").write_text(label * 100)


def killed_writer(out, label, fault):
    """Fork a child that writes `out` with `fault(atomic module)` installed (it SIGKILLs the child at its point)."""
    import os
    import signal

    import surgery.export.atomic as atomic

    pid = os.fork()
    if pid == 0:  # the child: no torch work here, so forking the test process is safe
        try:
            fault(atomic)
            write_output(out, label)
        finally:
            os._exit(0)  # only reached when the fault did not fire
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def kill_after_first_rename(atomic):
    import os
    import signal

    atomic._exchange = lambda a, b: False  # a file system without renameat2(RENAME_EXCHANGE)
    replace = os.replace

    def then_die(src, dst):
        replace(src, dst)
        if ".old-" in str(dst):
            os.kill(os.getpid(), signal.SIGKILL)

    atomic.os.replace = then_die


def kill_while_deleting_the_old_output(atomic):
    import os
    import signal

    def half_delete_then_die(path, *a, **k):
        (Path(path) / "label.txt").unlink()
        os.kill(os.getpid(), signal.SIGKILL)

    atomic.shutil.rmtree = half_delete_then_die


def label(out):
    return (out / "label.txt").read_text()


def test_kill_between_the_two_renames_is_recovered_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    write_output(out, "old")
    killed_writer(out, "new", kill_after_first_rename)
    assert not out.exists() and len(list(tmp_path.glob(".out.old-*"))) == 1  # the window the fallback has
    with pytest.raises(UserError, match="not empty"):
        write_output(out, "third", overwrite=False)  # the old output is put back, so it is not replaced
    assert label(out) == "old"
    assert not list(tmp_path.glob(".out.*"))


def test_kill_after_the_swap_leaves_the_new_output_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "out"
    write_output(out, "old")
    killed_writer(out, "new", kill_while_deleting_the_old_output)
    assert label(out) == "new"  # swapped in one step: never a moment without an output
    assert list(tmp_path.glob(".out.*"))  # the half-deleted old copy
    write_output(out, "third")
    assert label(out) == "third"
    assert not list(tmp_path.glob(".out.*"))


# ------------------------------------------------------------------------------------------- items 3, 5, 11 ----


def test_plan_that_is_a_device_a_fifo_or_huge_gives_one_line(capsys, tmp_path, model_dir, monkeypatch):
    import os

    import surgery.jsonfile

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes to it: opening it used to block forever
    big = tmp_path / "big.json"
    big.write_text(" " * 2000 + "{}")
    monkeypatch.setattr(surgery.jsonfile, "MAX_BYTES", 1000)
    for path, expected in (("/dev/zero", "not a regular file"), (fifo, "is empty"), (big, "larger than")):
        code, _, err = call(capsys, "apply", path, "--model", model_dir, "--out", tmp_path / "out")
        assert code == 2, err
        assert expected in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_plan_from_a_pipe_is_read_once(capsys, tmp_path, model_dir):
    import os

    read_end, write_end = os.pipe()
    os.write(write_end, write_plan(tmp_path).read_bytes())
    os.close(write_end)  # like `<(cat plan.json)`: the bytes can be read only once
    code, _, err = call(capsys, "apply", f"/dev/fd/{read_end}", "--model", model_dir, "--out", tmp_path / "out")
    os.close(read_end)
    assert code == 0, err
    assert (tmp_path / "out" / "surgery.json").is_file()


def prune_pipeline(model_dir) -> bytes:
    return json.dumps({"version": 1, "kind": "pipeline", "model": {"source": str(model_dir)},
                       "stages": [{"stage": "prune", "steps": [{"op": "drop_mlp", "layer": 1}]}]}).encode()


def test_pipeline_file_from_a_pipe_is_read_once(capsys, tmp_path, model_dir, monkeypatch):
    import os

    monkeypatch.setenv("WORKBENCH_JOBS", str(tmp_path / "jobs"))
    read_end, write_end = os.pipe()
    os.write(write_end, prune_pipeline(model_dir))
    os.close(write_end)  # `workbench apply <(cat pipeline.json)`: apply read it, then the pipeline read it again
    code, _, err = call(capsys, "apply", f"/dev/fd/{read_end}", "--out", tmp_path / "out")
    os.close(read_end)
    assert code == 0, err
    assert (tmp_path / "out" / "pipeline.json").is_file()


class stdin_from:
    """fd 0 replaced by `fd` for the block (what the shell does for `cat plan.json | workbench apply - ...`)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self):
        import os

        self.saved = os.dup(0)
        os.dup2(self.fd, 0)

    def __exit__(self, *exc):
        import os

        os.dup2(self.saved, 0)
        os.close(self.saved)


def test_dash_reads_plans_and_pipelines_from_standard_input(capsys, tmp_path, model_dir, monkeypatch):
    import os

    monkeypatch.setenv("WORKBENCH_JOBS", str(tmp_path / "jobs"))
    for name, doc in (("plan", write_plan(tmp_path).read_bytes()), ("pipeline", prune_pipeline(model_dir))):
        read_end, write_end = os.pipe()
        os.write(write_end, doc)
        os.close(write_end)
        with stdin_from(read_end):
            code, _, err = call(capsys, "apply", "-", "--model", model_dir, "--out", tmp_path / name)
        os.close(read_end)
        assert code == 0, (name, err)
        assert (tmp_path / name / "surgery.json").is_file()
    master, terminal = os.openpty()  # `workbench apply -` typed with nothing piped in: refused, not a silent wait
    with stdin_from(terminal):
        code, _, err = call(capsys, "plan", "validate", "-", "--model", model_dir)
    os.close(terminal)
    os.close(master)
    assert code == 2 and "standard input, which is a terminal" in one_error_line(err)


def test_deeply_nested_plan_gives_one_line(capsys, tmp_path, model_dir):
    for depth in (200, 5000):
        path = tmp_path / f"deep{depth}.json"
        path.write_text('{"version": 1, "steps": [], "provenance": {"x": ' + "[" * depth + "]" * depth + "}}")
        code, _, err = call(capsys, "plan", "validate", path, "--model", model_dir)
        assert code == 2, err
        assert "nested deeper than" in one_error_line(err)


def test_repeated_index_is_one_problem_and_the_list_is_capped(capsys, tmp_path, model_dir):
    plan = write_plan(tmp_path, [{"op": "prune_neurons", "layer": 0, "neurons": [5] * 1_000_000},
                                 {"op": "prune_neurons", "layer": 1, "neurons": list(range(1000, 2000))},
                                 {"op": "drop_layers", "layers": [1] * 1000}])
    code, _, err = call(capsys, "apply", plan, "--model", model_dir, "--out", tmp_path / "out")
    assert code == 2
    lines = err.splitlines()
    assert len(lines) <= 25, lines[:30]
    assert sum("neuron 5 listed 1,000,000 times" in line for line in lines) == 1
    assert any("980 more neurons out of range" in line for line in lines)
    assert sum("layer 1 listed 1,000 times" in line for line in lines) == 1


def test_plan_error_collapses_duplicates_and_caps():
    from surgery.errors import PlanError

    e = PlanError(["a", "b", "a"] + [f"p{i}" for i in range(500)])
    assert e.problems[:3] == ["a", "b", "p0"]
    assert len(e.problems) == PlanError.SHOWN + 1 and "more problem(s) not shown" in e.problems[-1]


@pytest.mark.parametrize("bad", ['"0"', "true", "1.0"])
def test_plan_indices_must_be_json_integers(capsys, tmp_path, model_dir, bad):
    path = tmp_path / "plan.json"
    path.write_text('{"version": 1, "steps": [{"op": "prune_neurons", "layer": 0, "neurons": [%s]}]}' % bad)
    code, _, err = call(capsys, "apply", path, "--model", model_dir, "--out", tmp_path / "out")
    assert code == 2, err
    assert "neurons[0]: Input should be a valid integer" in one_error_line(err)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- item 8 ----


@pytest.mark.parametrize("argv, flag", [
    (["score", "model-dir"], "'--out'"),
    (["distill"], "'--teacher'"),
    (["apply"], "'plan_file'"),
    (["inspect", "--bogus", "x"], "--bogus"),
    (["no-such-command"], "'no-such-command'"),
])
def test_usage_errors_show_usage_and_exit_2(capsys, argv, flag):
    code, _, err = call(capsys, *argv)
    assert code == 2, err
    assert err.startswith("Usage: workbench"), err
    assert flag in err.splitlines()[-1]
    assert "internal error" not in err


# ------------------------------------------------------------------------------------------------- item 7 ----


def test_event_appended_after_a_torn_tail_is_not_lost(tmp_path):
    from surgery.jobs.events import EventLog, read_events

    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.append("start", step=0)
    with open(path, "ab") as f:
        f.write(b'{"event": "step", "ste')  # the writer was killed mid-line
    log.append("launch", pid=123, attempt=2)
    events, _ = read_events(path)
    assert [e["event"] for e in events] == ["start", "launch"]


@pytest.mark.parametrize("content", [b"{bad", b"\x00\xff\xfe", b'{"version": 99}', b"[1]"])
def test_corrupt_job_json_is_one_line_for_show_logs_and_resume(capsys, tmp_path, content):
    job = tmp_path / "jobs" / "j1"
    job.mkdir(parents=True)
    (job / "job.json").write_bytes(content)
    for command in ("show", "logs", "resume"):
        code, out, err = call(capsys, "jobs", command, "j1", "--jobs-dir", tmp_path / "jobs")
        if command != "resume" and content == b'{"version": 99}':
            assert code == 0, err  # readable JSON: show and logs print what they can; resume refuses it
            continue
        assert code == 2, (command, out, err)
        one_error_line(err)
        assert "resumed" not in out
    assert not (job / "process.json").exists()  # nothing was launched


# ------------------------------------------------------------------------------------------------- item 9 ----


def test_cache_path_that_is_a_file_is_one_line(capsys, tmp_path, model_dir, monkeypatch):
    blocker = tmp_path / "cachefile"
    blocker.write_text("")
    monkeypatch.setenv("WORKBENCH_CACHE", str(blocker))
    code, _, err = call(capsys, "apply", write_plan(tmp_path), "--model", model_dir, "--out", tmp_path / "out")
    assert code == 2, err
    assert "WORKBENCH_CACHE" in one_error_line(err)


def test_unreadable_weights_are_an_environment_error_not_a_bug(capsys, tmp_path, model_dir, monkeypatch):
    import builtins

    real_open = builtins.open

    def deny(path, *a, **k):  # tests run as root here, where chmod 000 does not stop a read
        if str(path).endswith(".safetensors"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    code, _, err = call(capsys, "apply", write_plan(tmp_path), "--model", model_dir, "--out", tmp_path / "out")
    assert code == 2, err
    assert "Permission denied" in one_error_line(err) and "model.safetensors" in err


# ------------------------------------------------------------------------------------------- items 4, 10 ----


def tampered_copy(model_dir, target, **config):
    shutil.copytree(model_dir, target)
    cfg = json.loads((target / "config.json").read_text())
    cfg.update(config)
    (target / "config.json").write_text(json.dumps(cfg))
    return target


@pytest.mark.parametrize("field, value, expected", [
    ("intermediate_size", 10**10, "intermediate_size must be an integer"),
    ("intermediate_size", 10**6, "tensors give MLP width 96 but config.json says 1000000"),
    ("num_hidden_layers", 10**9, "num_hidden_layers must be an integer"),
    ("num_attention_heads", "eight", "num_attention_heads must be an integer"),
    ("num_key_value_heads", True, "num_key_value_heads must be an integer"),
])
def test_hostile_config_is_refused_before_anything_is_allocated(capsys, tmp_path, model_dir, field, value, expected):
    src = tampered_copy(model_dir, tmp_path / "src", **{field: value})
    capsys.readouterr()
    for argv in (["apply", write_plan(tmp_path), "--model", src, "--out", tmp_path / "out"], ["inspect", src]):
        code, _, err = call(capsys, *argv)
        assert code == 2, err
        assert expected in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_tampered_low_rank_rank_in_a_surgery_checkpoint_is_refused(capsys, tmp_path, model_dir):
    import surgery

    plan = write_plan(tmp_path, [{"op": "low_rank", "module": "model.layers.0.mlp.down_proj", "rank": 8}])
    out = tmp_path / "lowrank"
    assert call(capsys, "apply", plan, "--model", model_dir, "--out", out)[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["surgery_layers"][0]["low_rank"] = {"mlp.down_proj": 10**9}  # would allocate ~0.5 TB
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="low-rank"):
        surgery.load(str(out))


@pytest.mark.parametrize("damage", ["missing", "wrong shape"])
def test_missing_or_misshapen_tensor_is_one_line_without_the_load_report( tmp_path, model_dir, damage):
    src = tmp_path / "src"
    shutil.copytree(model_dir, src)
    state = load_file(src / "model.safetensors")
    if damage == "missing":
        del state["model.norm.weight"]
    else:
        state["model.norm.weight"] = torch.ones(65)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    import logging

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)  # whatever handler pytest left it, this one sees all
    try:
        with pytest.raises(SourceError, match="missing|do not match"):
            load_model(str(src))  # what every command that loads weights calls
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not any("LOAD REPORT" in m or "not sharded" in m for m in seen), seen


# ------------------------------------------------------------------------------------------------ item 13 ----


@pytest.fixture
def session_model(model_dir):
    from sessions import describe_source

    return describe_source(str(model_dir))


def test_journal_replay_refuses_a_mark_a_live_edit_refuses(tmp_path, session_model):
    from sessions import Session

    root = tmp_path / "sessions"
    s = Session.create("s", session_model, root=root, snapshot_every=1000)
    s.mark("neurons", [5], layer=1)
    with pytest.raises(UserError, match="out of range"):
        s.mark("neurons", [5], layer=99)
    seq = s.seq
    s.close()
    # a hand-edited journal smuggles in what the live edit refused (and a rank past the matrix)
    journal = root / "s" / "journal.jsonl"
    lines = journal.read_text().splitlines()
    bad = json.loads(lines[-1])
    bad.update(seq=seq + 1, payload={**bad["payload"], "layer": 99})
    rank = dict(bad, seq=seq + 2, kind="set_param",
                payload={"op": "low_rank", "module": "model.layers.0.mlp.down_proj", "rank": 10**6})
    journal.write_text("\n".join(lines + [json.dumps(bad), json.dumps(rank)]) + "\n")
    with Session.open("s", root=root) as reopened:
        marks = reopened.marks.model_dump()
        assert "99" not in json.dumps(marks) and "1000000" not in json.dumps(marks), marks
        assert sum("skipped entry" in n for n in reopened.notices) == 2, reopened.notices


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_a_deleted_or_emptied_journal_is_noticed(tmp_path, session_model, damage):
    from sessions import Session

    root = tmp_path / "sessions"
    with Session.create("s", session_model, root=root, snapshot_every=1000) as s:
        s.mark("neurons", [5], layer=1)  # journaled after the last snapshot
        s.snapshot()
        s.mark("neurons", [6], layer=1)
    # the journal behind session.json is lost (a careless `rm`, a restore from a backup, a full disk)
    journal = root / "s" / "journal.jsonl"
    journal.unlink() if damage == "deleted" else journal.write_bytes(b"")
    with Session.open("s", root=root) as reopened:
        assert any("journal.jsonl" in n and ("missing" in n or "emptied" in n) for n in reopened.notices), \
            reopened.notices


def test_two_processes_creating_one_session_both_get_it(tmp_path, session_model, monkeypatch):
    import sessions.session as session_module
    from sessions import Session

    root = tmp_path / "sessions"
    real_rename = session_module.os.rename
    racing = []

    def other_process_wins(src, dst):  # the other creator's rename lands between our check and ours
        if not racing:
            racing.append(dst)
            Session.create("s", session_model, root=root).close()
        return real_rename(src, dst)

    monkeypatch.setattr(session_module.os, "rename", other_process_wins)
    s, created = Session.open_or_create("s", session_model, root=root)
    with s:
        assert created is False and s.name == "s"
    shutil.rmtree(root / "s")
    racing.clear()
    with pytest.raises(UserError, match="already exists"):  # a plain create says so, not "is not a session"
        Session.create("s", session_model, root=root)


def test_journal_that_is_a_directory_is_one_line(capsys, tmp_path, session_model, monkeypatch):
    from sessions import Session

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    Session.create("s", session_model).close()
    journal = next((tmp_path / "home").rglob("journal.jsonl"))
    journal.unlink()
    journal.mkdir()
    code, _, err = call(capsys, "sessions", "show", "s")
    assert code == 2, err
    assert "journal.jsonl" in one_error_line(err)
