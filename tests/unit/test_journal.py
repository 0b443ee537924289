import json
import os

import pytest

from fleetbisect.journal import (Journal, JournalError, RunLock, RunLocked, holder_of, lock_is_held, read,
                                 replay)


def test_append_and_replay(tmp_path):
    j = Journal(tmp_path)
    j.append("run-started", config={"good": "a", "bad": "z"})
    j.append("step-started", index=1, commit="m")
    j.append("step-finished", record={"commit": "m", "verdict": "bad"})
    j.append("marked", commit="m", verdict="bad")
    j.append("step-started", index=2, commit="f")
    events, note = read(tmp_path)
    assert note is None
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    state = replay(events)
    assert state.config == {"good": "a", "bad": "z"}
    assert state.marks == [("m", "bad")]
    assert state.decided["m"]["verdict"] == "bad"
    assert state.interrupted_step["commit"] == "f"  # started, never finished: retest it


def test_sequence_continues_after_reopen(tmp_path):
    Journal(tmp_path).append("a")
    assert Journal(tmp_path).append("b")["seq"] == 2


def test_torn_last_line_is_dropped_with_a_note(tmp_path):
    j = Journal(tmp_path)
    j.append("run-started", config={})
    with open(tmp_path / "journal.jsonl", "a") as f:
        f.write('{"seq": 2, "event": "step-fini')
    events, note = read(tmp_path)
    assert [e["event"] for e in events] == ["run-started"]
    assert "journal.jsonl:2" in note and "half-written" in note


def test_corrupt_middle_line_is_refused_with_its_line(tmp_path):
    (tmp_path / "journal.jsonl").write_text(
        json.dumps({"seq": 1, "event": "run-started"}) + "\nGARBAGE\n" + json.dumps({"seq": 3, "event": "x"}) + "\n"
    )
    with pytest.raises(JournalError, match=r"journal.jsonl:2: corrupt"):
        read(tmp_path)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(JournalError, match="not a fleetbisect run directory"):
        read(tmp_path)


def test_a_torn_last_line_is_cut_on_open_so_appends_start_whole_lines(tmp_path):
    j = Journal(tmp_path)
    j.append("run-started", config={})
    with open(tmp_path / "journal.jsonl", "a") as f:
        f.write('{"seq": 2, "event": "step-fini')  # SIGKILL mid-write
    j = Journal(tmp_path)  # what `resume` opens
    assert "journal.jsonl:2" in j.note and "cut a half-written last line" in j.note
    assert j.append("resumed")["seq"] == 2
    j.append("step-started", index=1, commit="m")
    events, note = read(tmp_path)
    assert note is None
    assert [e["event"] for e in events] == ["run-started", "resumed", "step-started"]
    assert [e["seq"] for e in events] == [1, 2, 3]


def test_a_whole_last_event_without_its_newline_is_kept(tmp_path):
    (tmp_path / "journal.jsonl").write_text('{"seq":1,"event":"run-started","config":{}}')
    j = Journal(tmp_path)
    assert "lost its newline" in j.note
    j.append("resumed")
    events, note = read(tmp_path)
    assert [e["event"] for e in events] == ["run-started", "resumed"] and note is None


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:7])))  # a stingy kernel
    j = Journal(tmp_path)
    j.append("run-started", config={"good": "a" * 40})
    j.append("step-started", index=1, commit="b" * 40)
    monkeypatch.undo()
    events, note = read(tmp_path)
    assert note is None and [e["event"] for e in events] == ["run-started", "step-started"]


def test_a_guard_stops_appends(tmp_path):
    def lost():
        raise RuntimeError("lost the lease on h: gone")

    j = Journal(tmp_path, guard=lost)
    with pytest.raises(RuntimeError, match="lost the lease"):
        j.append("step-started", index=1, commit="m")
    assert not (tmp_path / "journal.jsonl").exists()


def test_a_resumed_abort_is_not_finished_any_more():
    events = [{"event": "run-started", "config": {}},
              {"event": "run-finished", "status": "aborted"},
              {"event": "resumed"}]
    assert replay(events).finished is None
    state = replay(events + [{"event": "run-finished", "status": "found"}])
    assert state.finished["status"] == "found" and state.final
    assert not replay(events[:2]).final  # an aborted run is resumable


def test_the_run_lock_refuses_a_second_controller_and_is_free_once_released(tmp_path):
    first = RunLock(tmp_path, {"host": "ctl", "pid": 4242, "token": "t1"}).acquire()
    assert lock_is_held(tmp_path) is True
    # flock conflicts between two opens even in one process: a second controller is refused.
    with pytest.raises(RunLocked, match=r"driven by a live controller \(pid 4242 on ctl"):
        RunLock(tmp_path, {"host": "ctl", "pid": 4343, "token": "t2"}).acquire()
    assert holder_of(tmp_path)["token"] == "t1"
    first.release()
    assert lock_is_held(tmp_path) is False
    with RunLock(tmp_path, {"host": "ctl", "pid": 4343, "token": "t2"}):
        assert holder_of(tmp_path)["token"] == "t2"
