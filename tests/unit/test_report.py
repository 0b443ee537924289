"""report.json / report.md / report.html from step records, and the replay rule for roles."""

from __future__ import annotations

import json
import socket
import subprocess

from fleetbisect.journal import replay
from fleetbisect.report import Report, status
from fleetbisect.step import StepRecord
from fleetbisect.verdict import Outcome, OutcomeKind, Verdict

A, B = "a" * 40, "b" * 40


def record(i, commit, verdict, role="bisect", subject="net: tidy <skb> & queues"):
    return StepRecord(i, commit, subject, verdict, "why | not", [Outcome(OutcomeKind.PASS, "ok")],
                      {"build": 2.0, "reproduce": 4.0}, [f"steps/{i:03d}-{commit[:12]}/console.log"], 1,
                      role=role)


def test_report_files_carry_the_culprit_steps_and_timeline(tmp_path):
    (tmp_path / "bisect.log").write_text("git bisect start\n# first bad commit: [bbbb]\n")
    r = Report(tmp_path, "/src/linux", A, B, "prime-radiant", "pb.yaml", "d" * 64)
    r.steps = [record(1, A, Verdict.GOOD, "endpoint-good"), record(2, B, Verdict.BAD)]
    r.status, r.culprit, r.culprit_subject, r.confirmed = "found", B, "net: break it", True
    r.culprit_author = "A Developer <a@dev.invalid>"
    r.message = f"{B} is the first bad commit"
    r.write()
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["culprit"] == B and data["confirmed"] is True
    assert [s["role"] for s in data["steps"]] == ["endpoint-good", "bisect"]
    md = (tmp_path / "report.md").read_text()
    assert f"`{B}` net: break it" in md and "confirmed on retest" in md
    assert "Author: A Developer <a@dev.invalid>" in md
    assert "why \\| not" in md  # a pipe in a reason does not break the table
    assert "# first bad commit: [bbbb]" in md
    html = (tmp_path / "report.html").read_text()
    assert "net: tidy &lt;skb&gt; &amp; queues" in html and "<skb>" not in html
    assert html.count('class="bar"') >= 4 + 6  # two stages per step, plus the legend
    assert 'href="steps/002-bbbbbbbbbbbb/console.log"' in html


def test_confirmation_records_are_never_reused_as_verdicts():
    events = [
        {"event": "run-started", "config": {}},
        {"event": "step-finished", "record": {"commit": A, "verdict": "bad", "role": "bisect"}},
        {"event": "step-finished", "record": {"commit": B, "verdict": "good", "role": "confirm-parent"}},
    ]
    state = replay(events)
    assert set(state.decided) == {A} and len(state.steps) == 2


def gone_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()  # a PID that no longer runs (a controller killed with SIGKILL)
    return p.pid


def test_status_of_a_stopped_run_says_how_to_resume(tmp_path):
    lines = [
        {"seq": 1, "time": 1.0, "event": "run-started", "config": {"run_id": "r1", "host": "h"},
         "controller": {"host": socket.gethostname(), "pid": gone_pid()}},
        {"seq": 2, "time": 2.0, "event": "step-started", "index": 1, "commit": A},
    ]
    (tmp_path / "journal.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    out = status(tmp_path)
    assert "stopped" in out and "was started and not finished" in out
    assert f"fleetbisect resume {tmp_path}" in out


def test_the_report_says_when_the_running_kernel_is_not_verified(tmp_path):
    from fleetbisect.config.playbook import load_playbook
    from fleetbisect.stages.ready import kernel_identity

    pb = tmp_path / "pb.yaml"
    pb.write_text("name: t\nbuild: {localversion: false, release_file: null}\n"
                  "reproducer: {kind: command, command: 'true', timeout: 5s}\n")
    r = Report(tmp_path, "/repo", "a" * 40, "b" * 40, "h", "pb.yaml", "d" * 64)
    r.kernel_identity, r.kernel_identity_note = kernel_identity(load_playbook(pb))
    r.write()
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["kernel_identity"] == "not-verified" and "release_file is null" in data["kernel_identity_note"]
    assert "running kernel checked: not-verified" in (tmp_path / "report.md").read_text()
