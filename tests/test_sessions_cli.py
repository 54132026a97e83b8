"""`workbench open` and `workbench sessions ...`: happy paths on a tiny model, bad input -> one line, exit 2."""

from __future__ import annotations

import io
import json

import pytest

from sessions import Session
from surgery.errors import UserError
from surgery.plan import load_plan
from cli_helpers import call, one_error_line
from tiny_models import make_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_model("llama").save_pretrained(path)
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_session(capsys, model_dir, name="smol", marks=True):
    code, out, err = call(capsys, "open", model_dir, "--session", name)
    assert code == 0, err
    if marks:
        with Session.open(name) as s:
            s.mark("heads", [1, 3], layer=0)
            s.mark("heads", [1, 3], layer=1)
            s.mark("neurons", [4, 5, 6], layer=2)
    return name


def test_open_creates_then_resumes(capsys, home, model_dir):
    code, out, err = call(capsys, "open", model_dir, "--session", "smol")
    assert code == 0, err
    assert "created session 'smol'" in out and str(model_dir) in out and "open it in the TUI" in err
    assert (home / "sessions" / "smol" / "journal.jsonl").is_file()
    assert not (home / "sessions" / "smol" / "lock").exists()  # released when the command ends
    code, out, err = call(capsys, "open", model_dir, "--session", "smol")
    assert code == 0 and "resumed session 'smol'" in out and "warning" not in err


def test_open_default_name_and_home_option(capsys, tmp_path, model_dir, monkeypatch):
    monkeypatch.delenv("WORKBENCH_HOME", raising=False)
    code, out, err = call(capsys, "open", model_dir, "--home", tmp_path / "elsewhere", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["name"] == "tiny-llama" and data["created_now"] is True
    assert (tmp_path / "elsewhere" / "sessions" / "tiny-llama" / "session.json").is_file()


def test_open_against_other_weights_warns_and_revalidates(capsys, home, model_dir, tmp_path):
    make_session(capsys, model_dir)
    other = tmp_path / "other"
    make_model("llama", seed=3).save_pretrained(other)
    code, out, err = call(capsys, "open", other, "--session", "smol")
    assert code == 0, err
    assert "warning: the session was made for weights" in err and "re-validated" in err
    code, out, err = call(capsys, "open", other, "--session", "smol", "--json")
    check = json.loads(out)["model_check"]
    assert check["same_weights"] is False and check["plan_fits"] is True
    (tmp_path / "x").mkdir()
    renamed = tmp_path / "x" / "smol"
    other.rename(renamed)  # default name "smol" collides with the session made for other weights
    code, _, err = call(capsys, "open", renamed)
    assert code == 2 and "exists for other weights" in one_error_line(err)


@pytest.mark.parametrize("name, message", [("a/b", "path separators"), ("..", "'..' is not allowed"),
                                           ("../../etc", "path separators"), ("x..y", "'..' is not allowed")])
def test_bad_session_names(capsys, home, model_dir, name, message):
    for argv in (["open", model_dir, "--session", name], ["sessions", "show", name], ["sessions", "rm", name, "--yes"]):
        code, out, err = call(capsys, *argv)
        assert code == 2 and message in one_error_line(err)
    assert not (home / "sessions").exists() or not any((home / "sessions").iterdir())


def test_unknown_session_lists_close_matches(capsys, home, model_dir):
    make_session(capsys, model_dir, "smol-q4", marks=False)
    for argv in (["sessions", "show", "smol-q5"], ["sessions", "export", "smol-q5", "--plan", "p.json"],
                 ["sessions", "replay", "smol-q5"], ["sessions", "rm", "smol-q5", "--yes"]):
        code, _, err = call(capsys, *argv)
        assert code == 2 and "did you mean: smol-q4?" in one_error_line(err)


def test_list_and_show(capsys, home, model_dir):
    code, out, _ = call(capsys, "sessions", "list")
    assert code == 0 and "no sessions" in out
    make_session(capsys, model_dir)
    job = home / "sessions" / "smol" / "jobs" / "j1"
    job.mkdir()
    (job / "job.json").write_text('{"status": "running"}')
    code, out, err = call(capsys, "sessions", "list")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("smol"))
    assert row.split()[-2:] == ["7", "1"]  # 7 marks, 1 running job
    assert "tiny-llama" in out and "\u2026" not in out  # a long model path is folded, never cut with an ellipsis
    code, out, _ = call(capsys, "sessions", "list", "--json")
    (info,) = json.loads(out)["sessions"]
    assert (info["marks"], info["running_jobs"], info["source"]) == (7, 1, str(model_dir))
    code, out, _ = call(capsys, "sessions", "show", "smol", "--json")
    data = json.loads(out)
    assert data["marks"]["heads"] == 4 and data["plan_steps"] == 3 and data["contents"]["jobs"][0]["id"] == "j1"
    code, out, _ = call(capsys, "sessions", "show", "smol")
    assert code == 0 and "marks     7" in out and "j1 (running)" in out


def test_export_writes_a_plan_that_validates(capsys, home, model_dir, tmp_path):
    make_session(capsys, model_dir)
    plan_file = tmp_path / "plan.json"
    code, out, err = call(capsys, "sessions", "export", "smol", "--plan", plan_file)
    assert code == 0, err
    plan = load_plan(plan_file)
    with Session.open("smol", readonly=True) as s:
        assert plan == s.plan()
    code, out, err = call(capsys, "plan", "validate", plan_file)
    assert code == 0, err


def test_export_refuses_an_invalid_plan_unless_asked(capsys, home, model_dir, tmp_path):
    make_session(capsys, model_dir, marks=False)
    with Session.open("smol") as s:
        s.mark("heads", [0], layer=0)
        s.mark("heads", [1], layer=1)
    code, _, err = call(capsys, "sessions", "export", "smol", "--plan", tmp_path / "p.json")
    assert code == 2 and len(err.strip().splitlines()) == 2 and "GQA" in err
    assert not (tmp_path / "p.json").exists()
    code, _, err = call(capsys, "sessions", "export", "smol", "--plan", tmp_path / "p.json", "--no-validate")
    assert code == 0 and len(load_plan(tmp_path / "p.json").steps) == 2


def test_replay_applies_the_session_plan(capsys, home, model_dir, tmp_path):
    make_session(capsys, model_dir)
    out_dir = tmp_path / "out"
    code, out, err = call(capsys, "sessions", "replay", "smol", "--out", out_dir, "--json")
    assert code == 0, err
    manifest = json.loads((out_dir / "surgery.json").read_text())
    with Session.open("smol", readonly=True) as s:
        assert manifest["plan"] == s.plan().model_dump(mode="json", exclude_none=True)
    assert manifest["params"]["after"] < manifest["params"]["before"]


def test_replay_defaults_to_the_session_exports(capsys, home, model_dir, monkeypatch):
    make_session(capsys, model_dir)
    seen = {}

    def fake_apply(self, out, **kwargs):  # the real apply is tested above; here only where it writes
        seen["out"] = out
        raise UserError("stop here")

    monkeypatch.setattr(Session, "apply", fake_apply)
    code, _, err = call(capsys, "sessions", "replay", "smol")
    assert code == 2 and "stop here" in one_error_line(err)
    assert seen["out"].parent == home / "sessions" / "smol" / "exports"


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_rm_asks_unless_yes(capsys, home, model_dir, monkeypatch):
    make_session(capsys, model_dir)
    session_dir = home / "sessions" / "smol"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal: refuse instead of guessing
    code, _, err = call(capsys, "sessions", "rm", "smol")
    assert code == 2 and "pass --yes" in one_error_line(err) and session_dir.is_dir()
    monkeypatch.setattr("sys.stdin", TTY("n\n"))
    code, out, _ = call(capsys, "sessions", "rm", "smol")
    assert code == 0 and "nothing removed" in out and session_dir.is_dir()
    monkeypatch.setattr("sys.stdin", TTY("y\n"))
    code, out, _ = call(capsys, "sessions", "rm", "smol")
    assert code == 0 and "removed" in out and not session_dir.exists()
    make_session(capsys, model_dir)
    code, out, _ = call(capsys, "sessions", "rm", "smol", "--yes")
    assert code == 0 and not session_dir.exists() and (home / "sessions").is_dir()


def test_corrupt_session_json_is_reported_and_recovered(capsys, home, model_dir):
    make_session(capsys, model_dir)
    (home / "sessions" / "smol" / "session.json").write_text("{oops")
    code, out, err = call(capsys, "sessions", "show", "smol")
    assert code == 0 and "session.json is corrupt" in err and "rebuilt the session from journal.jsonl" in err
    assert "marks     7" in out


def test_open_with_a_plan_file_loads_it_as_one_undoable_edit(capsys, home, model_dir, tmp_path):
    plan_file = tmp_path / "suggested.json"
    plan_file.write_text(json.dumps({"version": 1, "steps": [
        {"op": "prune_heads", "layer": 0, "heads": [1, 3]}, {"op": "drop_mlp", "layer": 2}]}))
    make_session(capsys, model_dir, marks=False)
    code, out, err = call(capsys, "open", model_dir, "--session", "smol", "--plan", plan_file)
    assert code == 0, err
    with Session.open("smol") as s:
        assert [st.op for st in s.plan().steps] == ["prune_heads", "drop_mlp"] and s.undo_depth == 1
        s.undo()  # one undo takes the whole file back
        assert s.plan().steps == []


def test_open_refuses_a_plan_that_does_not_fit_with_every_problem(capsys, home, model_dir, tmp_path):
    plan_file = tmp_path / "bad.json"
    plan_file.write_text(json.dumps({"version": 1, "steps": [
        {"op": "prune_heads", "layer": 0, "heads": [1]}, {"op": "prune_neurons", "layer": 9, "neurons": [1]}]}))
    code, out, err = call(capsys, "open", model_dir, "--session", "fresh", "--plan", plan_file)
    assert code == 2
    assert "steps[0]" in err and "steps[1]" in err  # both problems, before any session exists
    assert not (home / "sessions" / "fresh").exists()


def test_open_with_a_width_cut_keeps_it_and_export_and_replay_carry_it(capsys, home, model_dir, tmp_path):
    """A plan step the journal cannot hold (prune_hidden) goes to the session's UI state, never silently away."""
    plan_file = tmp_path / "width.json"
    plan_file.write_text(json.dumps({"version": 1, "steps": [
        {"op": "prune_heads", "layer": 0, "heads": [1, 3]}, {"op": "prune_hidden", "channels": [0, 5, 9, 17]}]}))
    make_session(capsys, model_dir, marks=False)
    code, out, err = call(capsys, "open", model_dir, "--session", "smol", "--plan", plan_file)
    assert code == 0, err
    with Session.open("smol", readonly=True) as s:
        assert [st.op for st in s.plan().steps] == ["prune_heads"]  # the journal: marks only
        assert [st.op for st in s.full_plan().steps] == ["prune_heads", "prune_hidden"]
    exported = tmp_path / "exported.json"
    code, out, err = call(capsys, "sessions", "export", "smol", "--plan", exported)
    assert code == 0, err
    assert [st.op for st in load_plan(exported).steps] == ["prune_heads", "prune_hidden"]
    code, out, err = call(capsys, "sessions", "replay", "smol", "--out", tmp_path / "cut", "--json")
    assert code == 0, err
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    original = json.loads((model_dir / "config.json").read_text())
    assert config["hidden_size"] == original["hidden_size"] - 4


def test_session_load_plan_refuses_steps_its_journal_cannot_hold(home, model_dir):
    from sessions import describe_source
    from surgery.errors import PlanError
    from surgery.plan import parse_plan

    plan = parse_plan({"version": 1, "steps": [{"op": "prune_hidden", "channels": [0, 1]}]})
    with Session.create("s", describe_source(str(model_dir)), root=home / "sessions") as s:
        with pytest.raises(PlanError, match="cannot hold prune_hidden"):
            s.load_plan(plan)
        assert s.mark_count == 0
