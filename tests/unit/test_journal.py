import json

import pytest

from fleetbisect.journal import Journal, JournalError, read, replay


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
