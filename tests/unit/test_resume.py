"""`resume` without a host: a finished run is reported, a changed inventory entry refused, and
`status` tells a live controller from a dead one by the run directory's lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from fleetbisect import cli
from fleetbisect.config.inventory import load_inventory
from fleetbisect.config.playbook import load_playbook
from fleetbisect.errors import UserError
from fleetbisect.journal import Journal, RunLock
from fleetbisect.lab.demo import lab_playbook
from fleetbisect.report import Report, status
from fleetbisect.run import RunSpec, _same_host, host_fingerprint, resume_run
from fleetbisect.ui import UI

A, B = "a" * 40, "b" * 40
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9 guest"


def write_inventory(path: Path, guest_port: int = 10022, connect_timeout: str = "10s") -> Path:
    path.write_text(f"""hosts:
  box:
    ssh: {{address: 127.0.0.1, port: 1, connect_timeout: {connect_timeout}}}
    target:
      kind: qemu
      guest: {{port: {guest_port}, host_key: "{KEY}"}}
""")
    return path


def started(run_dir: Path, inventory: Path, hooks: dict | None = None) -> RunSpec:
    host = load_inventory([inventory]).host("box")
    playbook = load_playbook(lab_playbook())
    spec = RunSpec("r1", run_dir, A, B, "box", [inventory], lab_playbook(), playbook.digest,
                   hooks=hooks or {}, host_fingerprint=host_fingerprint(host))
    Journal(run_dir).append("run-started", config=spec.to_json(), controller={"host": "x", "pid": 1})
    return spec


def test_resume_of_a_finished_run_reports_it_and_tests_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fired = tmp_path / "hook-fired"
    started(run_dir, write_inventory(tmp_path / "inv.yaml"),
            hooks={"finish": [f"touch {fired}"], "start": [f"touch {fired}"]})
    j = Journal(run_dir)
    j.append("step-finished", record={"commit": B, "verdict": "bad", "role": "bisect"})
    j.append("marked", commit=B, verdict="bad")
    j.append("run-finished", status="found", culprit=B, confirmed=True, message=f"{B} is the first bad commit")
    r = Report(run_dir, "/src", A, B, "box", "pb.yaml", "d" * 64)
    r.status, r.culprit, r.culprit_subject, r.message = "found", B, "net: break it", f"{B} is the first bad commit"
    r.write()
    (tmp_path / "inv.yaml").unlink()  # nothing of the config is needed to report a finished run
    before = (run_dir / "journal.jsonl").read_bytes()
    assert cli.main(["resume", str(run_dir)]) == 0
    out = capsys.readouterr()
    assert f"first bad commit: {B} net: break it" in out.out
    assert "already finished (found)" in out.err
    assert (run_dir / "journal.jsonl").read_bytes() == before  # not resumed, not retested
    assert not fired.exists()


def test_resume_of_an_inconclusive_run_exits_1(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    started(run_dir, write_inventory(tmp_path / "inv.yaml"))
    Journal(run_dir).append("run-finished", status="inconclusive", culprit=None,
                            message="only skipped commits are left")
    assert cli.main(["resume", str(run_dir)]) == 1
    assert "only skipped commits are left" in capsys.readouterr().err


def test_resume_refuses_a_changed_host_entry_and_names_the_field(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    inv = write_inventory(tmp_path / "inv.yaml")
    started(run_dir, inv)
    before = (run_dir / "journal.jsonl").read_bytes()
    write_inventory(inv, guest_port=10023)
    with pytest.raises(UserError, match=r"inv.yaml: host box changed since the run started "
                                        r"\(target.guest.port\).*start a new run"):
        resume_run(run_dir, UI(quiet=True))
    assert (run_dir / "journal.jsonl").read_bytes() == before


def test_transport_tuning_may_change_between_run_and_resume(tmp_path):
    inv = write_inventory(tmp_path / "inv.yaml")
    spec = RunSpec("r1", tmp_path, A, B, "box", [inv], lab_playbook(), "d",
                   host_fingerprint=host_fingerprint(load_inventory([inv]).host("box")))
    write_inventory(inv, connect_timeout="60s")
    _same_host(spec, load_inventory([inv]).host("box"))  # no error
    spec.host_fingerprint = None  # a journal from before fingerprints: nothing to compare
    _same_host(spec, load_inventory([write_inventory(inv, guest_port=2)]).host("box"))


def gone_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def journal_of(run_dir: Path, controller: dict) -> None:
    lines = [
        {"seq": 1, "time": 1.0, "event": "run-started", "config": {"run_id": "r1", "host": "h"},
         "controller": controller},
        {"seq": 2, "time": 2.0, "event": "step-started", "index": 1, "commit": A},
    ]
    (run_dir / "journal.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))


def test_status_running_while_the_lock_is_held_stopped_once_free_though_the_pid_lives(tmp_path):
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": "t"}
    journal_of(tmp_path, me)
    with RunLock(tmp_path, me):
        out = status(tmp_path)
        assert f"running (controller pid {os.getpid()} on this machine)" in out
        assert "fleetbisect resume" not in out
    # The pid still runs (it is this test), but it holds no lock: it is not driving the run.
    out = status(tmp_path)
    assert "stopped" in out and f"continue with: fleetbisect resume {tmp_path}" in out


def test_status_of_a_controller_on_another_machine_says_it_cannot_check(tmp_path):
    other = {"host": "far-away-laptop", "pid": 777, "token": "t"}
    journal_of(tmp_path, other)
    (tmp_path / "controller.lock").write_text(json.dumps(other) + "\n")
    out = status(tmp_path)
    assert "driven from far-away-laptop (pid 777), cannot check from here; lease last renewed" in out
    assert "stopped" not in out and "fleetbisect resume" not in out


def test_status_without_a_lock_file_falls_back_to_the_pid(tmp_path):
    journal_of(tmp_path, {"host": socket.gethostname(), "pid": gone_pid()})
    assert "stopped" in status(tmp_path)
