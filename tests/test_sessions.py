"""Sessions on disk (library): durable edits, undo/redo across restarts, recovery, locking, migration, contents.

The durability test kills a child process that edits a session with SIGKILL at random (seeded) points and checks
that reopening shows exactly the acknowledged edits (plus, at most, the one edit in flight when the kill landed).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sessions import (
    InvalidSessionName,
    ReadOnlySession,
    Session,
    SessionWriteError,
    UnknownSession,
    check_name,
    default_name,
    describe_source,
    list_sessions,
    remove_session,
)
from sessions.journal import JournalWriter
from sessions.model import FormatError
from surgery.errors import PlanError, UserError
from surgery.plan import parse_plan
from tiny_models import make_model

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (3 layers, 4 heads, 2 KV groups, MLP 96) on disk and its session model reference."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_model("llama").save_pretrained(path)
    return describe_source(str(path))


@pytest.fixture
def root(tmp_path):
    return tmp_path / "sessions"


def edit_a_little(s: Session) -> None:
    s.mark("heads", [1, 3], layer=0)
    s.mark("kv_groups", [1], layer=1)
    s.mark("neurons", [5, 6, 90], layer=2)
    s.mark("mlp", [1])
    s.set_rank("model.layers.2.self_attn.o_proj", 4)
    s.set_theme("gruvbox")
    s.set_ui("metric", "taylor")


def state_of(s: Session) -> dict:
    return {"marks": s.marks.model_dump(), "ui": s.ui.model_dump(), "seq": s.seq, "undo": s.undo_depth,
            "redo": s.redo_depth}


# ---- names --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "a/b", "a\\b", "..", "../x", "x..y", ".hidden", "-x", "a b", "x" * 101])
def test_bad_names_are_refused(bad):
    with pytest.raises(InvalidSessionName):
        check_name(bad)


def test_good_names_and_default_names():
    assert check_name("smol-q4_v2.1") == "smol-q4_v2.1"
    assert default_name("/models/SmolLM2-135M/") == "SmolLM2-135M"
    assert default_name("org/some model.gguf") == "some-model"
    assert check_name(default_name("HuggingFaceTB/SmolLM2..135M")) == "SmolLM2.135M"


def test_unknown_session_lists_close_matches(root, tiny):
    Session.create("smol-q4", tiny, root=root).close()
    with pytest.raises(UnknownSession, match=r"did you mean: smol-q4\?"):
        Session.open("smol-q5", root=root)


# ---- edits, plan, persistence --------------------------------------------------------------------------------------
def test_edits_survive_reopen_and_become_a_valid_plan(root, tiny):
    with Session.create("s", tiny, root=root) as s:
        edit_a_little(s)
        before = state_of(s)
        steps = s.plan().steps
    with Session.open("s", root=root) as s:
        assert state_of(s) == before
        assert s.plan().steps == steps
        assert s.ui.theme == "gruvbox" and s.ui.metric == "taylor"
        resolution = s.validate()
    cut0 = resolution.layers[0]
    assert cut0.kept_heads == [0, 2] and not resolution.layers[1].kept_groups == [0, 1]
    assert resolution.layers[1].kept_groups == [0] and len(resolution.layers[2].kept_neurons) == 93
    assert not resolution.layers[1].mlp_kept
    assert [st.op for st in steps] == ["prune_heads", "prune_kv_groups", "drop_mlp", "prune_neurons", "low_rank"]


def test_plan_indices_name_the_original_model(root, tiny):
    with Session.create("s", tiny, root=root) as s:
        s.mark("layers", [0])
        s.mark("heads", [0, 2], layer=2)  # layer 2 stays layer 2 although layer 0 is dropped
        plan = s.plan()
    assert plan.model.fingerprint == tiny.fingerprint and plan.model.source == tiny.source
    assert {"op": "prune_heads", "layer": 2, "heads": [0, 2]} in [st.model_dump() for st in plan.steps]


def test_bad_edits_are_refused_and_not_journaled(root, tiny):
    with Session.create("s", tiny, root=root) as s:
        for call in (lambda: s.mark("heads", [4], layer=0), lambda: s.mark("neurons", [96], layer=0),
                     lambda: s.mark("layers", [3]), lambda: s.mark("heads", [0]), lambda: s.mark("eyes", [0]),
                     lambda: s.set_rank("model.layers.0.mlp.nope", 2),
                     lambda: s.set_rank("model.layers.0.mlp.down_proj", 0),
                     lambda: s.set_rank("model.layers.0.mlp.down_proj", 97)):
            with pytest.raises(UserError):
                call()
        assert s.mark("heads", [1], layer=0) is not None
        assert s.mark("heads", [1], layer=0) is None  # already marked: nothing to journal
        seq = s.seq
    lines = (root / "s" / "journal.jsonl").read_text().splitlines()
    assert len(lines) == seq == 2


def test_gqa_breaking_marks_are_kept_but_fail_validation(root, tiny):
    with Session.create("s", tiny, root=root) as s:
        s.mark("heads", [0], layer=0)  # marking is free-form; the GQA rule is the plan's business
        with pytest.raises(PlanError, match="GQA"):
            s.validate()


def test_load_plan_and_clear_are_one_undo_step_each(root, tiny):
    plan = parse_plan({"version": 1, "steps": [{"op": "drop_layers", "layers": [2]},
                                               {"op": "prune_neurons", "layer": 0, "neurons": [1, 2]},
                                               {"op": "low_rank", "module": "model.layers.1.mlp.up_proj", "rank": 3}]})
    with Session.create("s", tiny, root=root) as s:
        s.mark("heads", [0, 2], layer=1)
        s.load_plan(plan)
        assert s.plan().steps == plan.steps
        s.clear()
        assert s.mark_count == 0
        s.undo()
        assert s.plan().steps == plan.steps
        s.undo()
        assert s.marked("heads", 1) == {0, 2} and s.mark_count == 2


# ---- undo / redo ---------------------------------------------------------------------------------------------------
def test_undo_redo_across_restarts(root, tiny):
    with Session.create("s", tiny, root=root) as s:
        s.mark("neurons", [1], layer=0)
        s.mark("neurons", [2], layer=0)
        s.set_rank("model.layers.0.mlp.down_proj", 8)
        s.set_theme("light")  # not an undoable edit
        assert s.undo().payload == {"target": 4}
        assert s.undo() is not None
    with Session.open("s", root=root) as s:
        assert s.marked("neurons", 0) == {1} and s.ranks == {} and s.ui.theme == "light"
        assert (s.undo_depth, s.redo_depth) == (1, 2)
        s.redo()
    with Session.open("s", root=root) as s:
        assert s.marked("neurons", 0) == {1, 2}
        s.mark("neurons", [3], layer=0)  # a new edit forks history: the undone rank cannot come back
        assert not s.can_redo and s.redo() is None
    with Session.open("s", root=root) as s:
        assert s.redo() is None
        while s.undo():
            pass
        assert s.mark_count == 0 and s.redo_depth == 3


def test_snapshot_plus_journal_tail(root, tiny):
    s = Session.create("s", tiny, root=root, snapshot_every=3)
    for i in range(8):
        s.mark("neurons", [i], layer=1)
    snap = json.loads((root / "s" / "session.json").read_text())
    assert 1 < snap["journal_seq"] < s.seq  # the snapshot lags: the tail must come from the journal
    expected = state_of(s)
    reader = Session.open("s", root=root, readonly=True)  # `s` still holds the lock, as after a crash
    assert state_of(reader) == expected
    s.close()
    assert json.loads((root / "s" / "session.json").read_text())["journal_seq"] == expected["seq"]


# ---- durability under SIGKILL ---------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import json, random, sys
    from pathlib import Path
    from sessions import Session

    root, seed = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    s = Session.open("dur", root=root, snapshot_every=4)
    assert not s.readonly, s.notices
    print("ready", s.seq, flush=True)
    themes = ["dark", "light", "gruvbox"]
    while True:
        r = rng.random()
        layer = rng.randrange(3)
        if r < 0.35:
            d = {"op": "mark", "items": [[layer, rng.randrange(96)]]}
        elif r < 0.5:
            d = {"op": "unmark", "items": [[layer, rng.randrange(96)]]}
        elif r < 0.6:
            d = {"op": "mark", "items": [[layer, rng.randrange(96)] for _ in range(rng.randint(2, 6))], "bulk": 1}
        elif r < 0.7:
            d = {"op": "rank", "module": f"model.layers.{layer}.mlp.down_proj", "rank": rng.choice([None, 2, 4, 8])}
        elif r < 0.75:
            d = {"op": "theme", "theme": rng.choice(themes)}
        elif r < 0.88:
            d = {"op": "undo"}
        else:
            d = {"op": "redo"}
        print("try", json.dumps(d), flush=True)
        if d["op"] in ("mark", "unmark") and not d.get("bulk"):
            (l, i), = d["items"]
            entry = (s.mark if d["op"] == "mark" else s.unmark)("neurons", [i], layer=l)
        elif d["op"] == "mark":
            entry = s.bulk_mark([{"what": "neurons", "layer": l, "indices": [i]} for l, i in d["items"]])
        elif d["op"] == "rank":
            entry = s.set_rank(d["module"], d["rank"])
        elif d["op"] == "theme":
            entry = s.set_theme(d["theme"])
        else:
            entry = getattr(s, d["op"])()
        print("ack", entry.seq if entry else 0, flush=True)
""")


class Expected:
    """An independent model of what a session holds after a list of edits (plain sets, own undo/redo)."""

    def __init__(self):
        self.neurons = {0: set(), 1: set(), 2: set()}
        self.ranks: dict[str, int] = {}
        self.theme = None
        self.undo: list[list] = []
        self.redo: list[list] = []
        self.seq = 1

    def copy(self) -> Expected:
        e = Expected()
        e.neurons = {k: set(v) for k, v in self.neurons.items()}
        e.ranks, e.theme, e.seq = dict(self.ranks), self.theme, self.seq
        e.undo, e.redo = list(self.undo), list(self.redo)
        return e

    def _do(self, change, inverse=False):
        if change[0] == "rank":
            _, module, before, after = change
            value = before if inverse else after
            if value is None:
                self.ranks.pop(module, None)
            else:
                self.ranks[module] = value
        else:
            _, layer, i, add = change
            (self.neurons[layer].add if add != inverse else self.neurons[layer].discard)(i)

    def apply(self, d) -> bool:
        """Apply one edit description; returns whether it changed anything (and so got a seq)."""
        changes = []
        if d["op"] in ("mark", "unmark"):
            for layer, i in d["items"]:
                present = i in self.neurons[layer]
                if (d["op"] == "mark") != present:
                    changes.append(("n", layer, i, d["op"] == "mark"))
                    self._do(changes[-1])
        elif d["op"] == "rank":
            before = self.ranks.get(d["module"])
            if before != d["rank"]:
                changes.append(("rank", d["module"], before, d["rank"]))
                self._do(changes[-1])
        elif d["op"] == "theme":
            if self.theme == d["theme"]:
                return False
            self.theme = d["theme"]
            self.seq += 1
            return True
        else:
            src, dst = (self.undo, self.redo) if d["op"] == "undo" else (self.redo, self.undo)
            if not src:
                return False
            item = src.pop()
            for c in (reversed(item) if d["op"] == "undo" else item):
                self._do(c, inverse=d["op"] == "undo")
            dst.append(item)
            self.seq += 1
            return True
        if not changes:
            return False
        self.undo.append(changes)
        self.redo.clear()
        self.seq += 1
        return True

    def matches(self, s: Session) -> bool:
        return ({k: s.marked("neurons", k) for k in range(3)} == self.neurons and s.ranks == self.ranks
                and s.ui.theme == self.theme and s.seq == self.seq
                and (s.undo_depth, s.redo_depth) == (len(self.undo), len(self.redo)))


def test_sigkill_at_random_points_loses_no_acknowledged_edit(root, tiny):
    Session.create("dur", tiny, root=root).close()
    rng = random.Random(20240611)
    expected = Expected()
    in_flight_seen = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(rng.randrange(10**6))], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline().split()
        assert first[:1] == ["ready"], proc.stderr.read()
        assert int(first[1]) == expected.seq
        acks_wanted, acks = rng.randint(3, 40), 0
        lines = []
        while acks < acks_wanted:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
            acks += line.startswith("ack")
        time.sleep(rng.uniform(0, 0.004))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lines += proc.stdout.read().splitlines(keepends=True)  # not communicate(): it would skip buffered lines
        proc.stdout.close()
        proc.stderr.close()
        pending = None
        for line in lines:
            if not line.endswith("\n"):
                break  # a line cut by the kill: not an acknowledgement
            word, _, arg = line.strip().partition(" ")
            if word == "try":
                pending = json.loads(arg)
            elif word == "ack":
                changed = expected.apply(pending)
                assert int(arg) == (expected.seq if changed else 0)
                pending = None
        with_pending = expected.copy()
        if pending is not None:
            with_pending.apply(pending)
        with Session.open("dur", root=root) as s:  # the child's lock is stale (its pid is dead) and taken over
            assert not s.readonly
            assert any("stale lock" in n for n in s.notices), s.notices
            assert not list(s.path.glob(".*.tmp"))  # temp files of snapshots cut short by the kill are gone
            if expected.matches(s):
                pass
            else:
                assert with_pending.matches(s), "reopened state is neither the acknowledged edits nor those + 1"
                expected, in_flight_seen = with_pending, in_flight_seen + 1
    assert expected.seq > 20  # the test did make edits


# ---- torn journal, corrupt snapshot, failed writes ------------------------------------------------------------------
def test_torn_last_journal_line_is_ignored_with_a_warning(root, tiny):
    with Session.create("s", tiny, root=root) as s:
        edit_a_little(s)
        expected = state_of(s)
    journal = root / "s" / "journal.jsonl"
    whole = b'{"kind":"mark","payload":{"indices":[7],"layer":0,"what":"neurons"},"seq":9,"time":1.0,"v":1}\n'
    with open(journal, "ab") as f:
        f.write(whole[: len(whole) // 2])  # power loss in the middle of a write
    reader = Session.open("s", root=root, readonly=True)
    assert state_of(reader) == expected and any("torn last line" in n for n in reader.notices)
    assert journal.read_bytes().endswith(whole[: len(whole) // 2])  # read-only: the file is left as it is
    with Session.open("s", root=root) as s:
        assert state_of(s) == expected and any("torn" in n for n in s.notices)
        s.mark("neurons", [7], layer=0)  # appended after the torn bytes were cut off
        expected = state_of(s)
    with Session.open("s", root=root) as s:
        assert state_of(s) == expected and not s.notices
    for line in journal.read_text().splitlines():
        json.loads(line)


def test_corrupt_session_json_falls_back_to_the_journal(root, tiny):
    with Session.create("s", tiny, root=root, snapshot_every=2) as s:
        edit_a_little(s)
        s.undo()
        expected = state_of(s)
    (root / "s" / "session.json").write_text('{"version": 2, "name": "s", "marks": {')
    reader = Session.open("s", root=root, readonly=True)
    assert state_of(reader) == expected
    assert any("session.json is corrupt" in n and "rebuilt the session from journal.jsonl" in n
               for n in reader.notices)
    with Session.open("s", root=root) as s:
        assert state_of(s) == expected and s.model == tiny
        s.redo()
    assert list((root / "s").glob("session.json.corrupt-*"))  # kept for inspection
    with Session.open("s", root=root) as s:
        assert not s.notices and s.ranks == {"model.layers.2.self_attn.o_proj": 4}


def test_missing_snapshot_and_journal_without_creation_is_an_error(root, tiny):
    Session.create("s", tiny, root=root).close()
    (root / "s" / "session.json").write_text("[]")
    lines = (root / "s" / "journal.jsonl").read_text().splitlines()
    (root / "s" / "journal.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(UserError, match="does not start with the session's creation"):
        Session.open("s", root=root)


def test_a_failed_journal_write_changes_nothing(root, tiny, monkeypatch):
    with Session.create("s", tiny, root=root) as s:
        s.mark("neurons", [1], layer=0)
        before = state_of(s)

        def full(self, entry):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(JournalWriter, "append", full)
        with pytest.raises(SessionWriteError, match="No space left"):
            s.bulk_mark([{"what": "neurons", "layer": 0, "indices": [2, 3]}], replace=True)
        assert state_of(s) == before
        monkeypatch.undo()
        s.mark("neurons", [2], layer=0)
    with Session.open("s", root=root) as s:
        assert s.marked("neurons", 0) == {1, 2}


# ---- locking and read-only filesystems ----------------------------------------------------------------------------
def test_second_opener_gets_read_only(root, tiny):
    first = Session.create("s", tiny, root=root)
    first.mark("heads", [0, 1], layer=0)
    second = Session.open("s", root=root)
    assert second.readonly and "open in another process" in second.notices[0]
    assert f"pid {os.getpid()}" in second.notices[0]
    assert second.marked("heads", 0) == {0, 1}
    with pytest.raises(ReadOnlySession, match="read-only"):
        second.mark("heads", [2], layer=0)
    first.close()
    with Session.open("s", root=root) as third:
        assert not third.readonly and not third.notices


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid is certainly not running (and not a zombie)
    return proc.pid


def write_lock(path: Path, pid: int, host: str) -> None:
    path.write_text(json.dumps({"pid": pid, "host": host, "started": None, "since": time.time(), "token": "x"}))


def test_stale_lock_is_taken_over_and_foreign_host_lock_is_respected(root, tiny):
    Session.create("s", tiny, root=root).close()
    lock = root / "s" / "lock"
    write_lock(lock, dead_pid(), socket.gethostname())
    with Session.open("s", root=root) as s:
        assert not s.readonly and "took over a stale lock" in s.notices[0]
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()  # released on close
    write_lock(lock, 1, "some-other-host")
    with Session.open("s", root=root) as s:
        assert s.readonly and "some-other-host" in s.notices[0] and "delete" in s.notices[0]
    assert json.loads(lock.read_text())["host"] == "some-other-host"  # never removed by a reader


def test_read_only_filesystem_opens_read_only(root, tiny, monkeypatch):
    with Session.create("s", tiny, root=root) as s:
        edit_a_little(s)
        expected = state_of(s)
    real_open = os.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def read_only_fs(path, flags, *args, **kwargs):
        if str(path).startswith(str(root)) and flags & writes:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_fs)
    s = Session.open("s", root=root)
    assert s.readonly and "Read-only file system" in s.notices[0] and "opened read-only" in s.notices[0]
    assert state_of(s) == expected
    with pytest.raises(ReadOnlySession):
        s.undo()
    s.close()
    assert not (root / "s" / "lock").exists()


# ---- formats --------------------------------------------------------------------------------------------------------
def test_version_1_session_opens_and_is_upgraded(root, tiny):
    """A hand-written version-1 session (plan steps + top-level theme) plus a journal tail written after it."""
    d = root / "old"
    d.mkdir(parents=True)
    v1 = {"version": 1, "name": "old", "created": 1700000000.0,
          "model": {"source": tiny.source, "fingerprint": tiny.fingerprint},
          "plan": {"steps": [{"op": "prune_heads", "layer": 0, "heads": [1, 3]}, {"op": "drop_layers", "layers": [2]},
                             {"op": "low_rank", "module": "model.layers.1.mlp.down_proj", "rank": 4}]},
          "theme": "light", "journal_seq": 5}
    (d / "session.json").write_text(json.dumps(v1))
    (d / "journal.jsonl").write_text(
        '{"kind":"mark","payload":{"indices":[1,3],"layer":0,"what":"heads"},"seq":5,"time":1700000001.0,"v":1}\n'
        '{"kind":"mark","payload":{"indices":[0],"layer":1,"what":"kv_groups"},"seq":6,"time":1700000002.0,"v":1}\n')
    reader = Session.open("old", root=root, readonly=True)
    assert any("format version 1" in n for n in reader.notices)
    with Session.open("old", root=root) as s:
        assert s.marked("heads", 0) == {1, 3} and s.marked("layers") == {2} and s.marked("kv_groups", 1) == {0}
        assert s.ranks == {"model.layers.1.mlp.down_proj": 4} and s.ui.theme == "light" and s.seq == 6
        assert any("upgraded from format version 1" in n for n in s.notices)
        s.undo()  # the journal tail is history too
        assert s.marked("kv_groups", 1) == set()
    assert json.loads((d / "session.json").read_text())["version"] == 2
    assert json.loads((d / "session.json.v1").read_text()) == v1
    with Session.open("old", root=root) as s:
        assert not s.notices and s.mark_count == 4


def test_newer_format_is_refused_not_misread(root, tiny):
    Session.create("s", tiny, root=root).close()
    path = root / "s" / "session.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 99}))
    with pytest.raises(FormatError, match="newer workbench"):
        Session.open("s", root=root)


def test_files_are_sorted_json_with_versions(root, tiny):
    with Session.create("s", tiny, root=root) as s:
        edit_a_little(s)
    text = (root / "s" / "session.json").read_text()
    data = json.loads(text)
    assert data["version"] == 2 and list(data) == sorted(data)
    for line in (root / "s" / "journal.jsonl").read_text().splitlines():
        entry = json.loads(line)
        assert entry["v"] == 1 and list(entry) == sorted(entry)


# ---- other weights, contents, listing, removal ---------------------------------------------------------------------
def test_other_weights_warn_and_revalidate(root, tiny, tmp_path):
    other_dir = tmp_path / "other"
    make_model("llama", seed=5).save_pretrained(other_dir)
    with Session.create("s", tiny, root=root) as s:
        s.mark("heads", [1, 3], layer=2)
        check = s.check_model(describe_source(str(other_dir)))
        assert check.same_weights is False and check.plan_fits and "re-validated" in check.messages()[0]
        assert s.check_model(tiny).same_weights is True and not s.check_model(tiny).messages()
        smaller = tiny.model_copy(update={"fingerprint": "sha256:" + "1" * 64,
                                          "config": {**tiny.config, "num_hidden_layers": 2}})
        check = s.check_model(smaller)
        assert check.problems == ["steps[0].layer: layer 2 out of range (the model has 2 layers)"]


def test_contents_listing_and_running_jobs(root, tiny):
    with Session.create("s", tiny, root=root) as s:
        s.mark("neurons", [1, 2], layer=0)
        d = s.path
    (d / "scores" / "fp1").mkdir()
    (d / "scores" / "fp1" / "taylor.safetensors").write_bytes(b"x")
    for job, content in {"j1": '{"status": "running"}', "j2": "{not json", "j3": '{"state": "done"}',
                         "j4": json.dumps({"status": "running", "pid": dead_pid()})}.items():
        (d / "jobs" / job).mkdir()
        (d / "jobs" / job / "job.json").write_text(content)
    (d / "jobs" / "j5").mkdir()  # no job.json yet
    (d / "evals" / "e1.json").write_text("{}")
    (d / "exports" / "20250101-000000").mkdir()
    with Session.open("s", root=root, readonly=True) as s:
        c = s.contents()
    assert c.scores == ["fp1/taylor.safetensors"] and c.evals == ["e1.json"] and c.exports == ["20250101-000000"]
    assert {j.id: j.status for j in c.jobs} == {"j1": "running", "j2": "unknown", "j3": "done", "j4": "dead",
                                               "j5": "unknown"}
    (rows,) = list_sessions(root)
    assert (rows.name, rows.source, rows.marks, rows.running_jobs) == ("s", tiny.source, 2, 1)


def test_remove_never_touches_anything_outside(root, tiny, tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "model.safetensors").write_text("keep me")
    with Session.create("s", tiny, root=root) as s:
        s.mark("layers", [1])
    (root / "s" / "exports" / "link").symlink_to(outside, target_is_directory=True)
    (root / "s" / "scores" / "filelink").symlink_to(outside / "model.safetensors")
    holder = Session.open("s", root=root)
    with pytest.raises(UserError, match="open in another process"):
        remove_session("s", root)
    holder.close()
    with pytest.raises(InvalidSessionName):
        remove_session("../precious", root)
    remove_session("s", root)
    assert not (root / "s").exists() and not list(root.iterdir())
    assert (outside / "model.safetensors").read_text() == "keep me"
    with pytest.raises(UnknownSession):
        remove_session("s", root)


def test_create_refuses_existing_session(root, tiny):
    Session.create("s", tiny, root=root).close()
    with pytest.raises(UserError, match="already exists"):
        Session.create("s", tiny, root=root)
    s, created = Session.open_or_create("s", tiny, root=root)
    assert not created and not s.readonly
    s.close()


def test_sessions_package_imports_no_ui():
    code = ("import sys, sessions, sessions.store; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('textual', 'typer', 'rich', 'click', 'plotext', 'workbench', 'themes', 'torch')); "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-500:]


def test_corrupt_line_inside_the_journal_is_skipped_with_a_warning(root, tiny):
    with Session.create("s", tiny, root=root, snapshot_every=1000) as s:
        s.mark("neurons", [1], layer=0)
        s.mark("neurons", [2], layer=0)
        s.mark("neurons", [3], layer=0)
    journal = root / "s" / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    lines[2] = "#" * (len(lines[2]) - 1) + "\n"  # bit rot in the entry that marked neuron 2
    journal.write_text("".join(lines))
    (root / "s" / "session.json").unlink()
    with Session.open("s", root=root) as s:
        assert s.marked("neurons", 0) == {1, 3}
        assert any("skipped a corrupt line" in n for n in s.notices) and any("missing" in n for n in s.notices)
        assert s.mark("neurons", [4], layer=0).seq == 5  # seqs are never handed out twice


def test_undo_history_is_capped(root, tiny, monkeypatch):
    import sessions.state

    monkeypatch.setattr(sessions.state, "HISTORY_LIMIT", 3)
    with Session.create("s", tiny, root=root) as s:
        for i in range(5):
            s.mark("neurons", [i], layer=0)
        assert s.undo_depth == 3
        while s.undo():
            pass
        assert s.marked("neurons", 0) == {0, 1}
