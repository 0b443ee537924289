"""Kill the controller with SIGKILL at many points of a real lab bisect; `resume` must finish
it with the same culprit, no commit marked twice, no verdict lost, no finished step retested."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from .conftest import CULPRIT

FB = [sys.executable, "-m", "fleetbisect", "--json"]


class Controller:
    """`fleetbisect --json ...` in its own process group, its events read as they come."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [*FB, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.put(json.loads(line))
        self.events.put(None)

    def wait_for(self, predicate, timeout: float = 300) -> dict:
        """The first event matching `predicate`; the controller is left running."""
        end = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.1, end - time.monotonic()))
            if event is None:
                pytest.fail(f"the controller ended before the event: {self.proc.stderr.read()[-2000:]}")
            if predicate(event):
                return event

    def kill_at(self, predicate, timeout: float = 300, sig: int = signal.SIGKILL) -> dict:
        """Signal the whole process group at the first event matching `predicate`, wait for it."""
        try:
            return self.wait_for(predicate, timeout)
        finally:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=120)

    def finish(self, timeout: float = 600) -> tuple[int, list[dict], str]:
        """Wait for the end: (exit status, every event it printed, stderr)."""
        err = self.proc.stderr.read()
        self.proc.wait(timeout=timeout)
        events = []
        while (event := self.events.get(timeout=timeout)) is not None:
            events.append(event)
        return self.proc.returncode, events, err


def stage(name, nth=1):
    seen = {"n": 0}

    def match(e):
        if e["event"] == "stage-started" and e["stage"] == name:
            seen["n"] += 1
            return seen["n"] == nth
        return False

    return match


def journal(run_dir):
    return [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]


@pytest.mark.timeout(1500)
def test_sigkill_anywhere_then_resume_finds_the_same_culprit(
    lab_repo, inventory_file, lab_host, playbook_variant, tmp_path
):
    _, playbook = playbook_variant({"reproducer": {"timeout": "6s"}, "policy": {"confirm": 0}})
    run_dir = tmp_path / "run"
    first = Controller(
        "run", "--host", lab_host.name, "--playbook", str(playbook), "--inventory", str(inventory_file),
        "--repo", str(lab_repo.path), "--good", lab_repo.good, "--bad", lab_repo.bad,
        "--run-dir", str(run_dir), "--no-endpoint-check",
    )
    kill_points = [
        ("during a build", stage("build")),
        ("during a push", stage("push")),
        ("during a reproducer", stage("reproduce")),
        ("between a mark and the next step", lambda e: e["event"] == "marked"),
        ("while the guest boots", stage("ready")),
    ]
    # Ctrl-C first: the step is abandoned, its VM stopped, the journal says where it stopped.
    first.kill_at(stage("reproduce"), sig=signal.SIGINT)
    assert first.proc.returncode == 130
    assert journal(run_dir)[-1]["event"] == "interrupted"
    assert not (lab_host.base_dir / "work" / "vm" / "qemu.pid").exists()
    killed_at = []
    controller = Controller("resume", str(run_dir))
    for name, predicate in kill_points:
        event = controller.kill_at(predicate)
        killed_at.append((name, event))
        controller = Controller("resume", str(run_dir))
    status, printed, err = controller.finish()
    assert status == 0, err[-3000:]
    assert printed[-1]["event"] == "run-finished" and printed[-1]["culprit"] == lab_repo.shas[CULPRIT]

    events = journal(run_dir)
    assert sum(e["event"] == "resumed" for e in events) == len(kill_points) + 1
    marks = [e["commit"] for e in events if e["event"] == "marked"]
    assert len(marks) == len(set(marks)), "a commit was marked twice"
    finished: set[str] = set()
    for e in events:
        if e["event"] == "step-started":
            assert e["commit"] not in finished, f"{e['commit'][:12]} was tested again after its verdict"
        elif e["event"] == "step-finished":
            finished.add(e["record"]["commit"])
    # Every mark rests on a finished step, and git's log agrees with the journal.
    assert set(marks) <= finished
    bisect_log = (run_dir / "bisect.log").read_text()
    assert f"# first bad commit: [{lab_repo.shas[CULPRIT]}]" in bisect_log
    report = json.loads((run_dir / "report.json").read_text())
    assert report["culprit"] == lab_repo.shas[CULPRIT]
    assert len(report["steps"]) == len(finished)
    # A VM the killed controller left running was stopped by the resumed one before it booted
    # its own (the kill "during a reproducer" leaves one).
    assert "previous VM: stopped" in (run_dir / "run.log").read_text()


def test_resume_refuses_what_is_not_a_run_and_a_changed_playbook(
    lab_repo, inventory_file, lab_host, playbook_variant, tmp_path
):
    p = subprocess.run([*FB, "resume", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not a fleetbisect run" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr

    _, playbook = playbook_variant({"policy": {"confirm": 0}})
    run_dir = tmp_path / "run"
    first = Controller(
        "run", "--host", lab_host.name, "--playbook", str(playbook), "--inventory", str(inventory_file),
        "--repo", str(lab_repo.path), "--good", lab_repo.good, "--bad", lab_repo.bad,
        "--run-dir", str(run_dir), "--no-endpoint-check",
    )
    first.kill_at(lambda e: e["event"] == "step-finished")
    before = (run_dir / "journal.jsonl").read_bytes()
    playbook.write_text(playbook.read_text().replace("iterations: 12", "iterations: 11"))
    p = subprocess.run([*FB, "resume", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "changed since the run started" in p.stderr, p.stderr
    assert (run_dir / "journal.jsonl").read_bytes() == before  # nothing lost, nothing added


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs of our own: room for the run's worktree and builds, not for much more."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_stops_the_run_clearly_and_resume_finishes_it(
    lab_repo, inventory_file, lab_host, playbook_variant, small_disk, tmp_path
):
    _, playbook = playbook_variant({"policy": {"confirm": 0}})
    run_dir = small_disk / "run"
    # After the first verdict (once: the resumed run keeps its hooks), a hook fills the disk the
    # run directory is on.
    once = tmp_path / "filled"
    fill = (f'[ -e {once} ] || {{ touch {once}; '
            'dd if=/dev/zero of="$FLEETBISECT_RUN_DIR/../ballast" bs=1M 2>/dev/null; }; true')
    p = subprocess.run(
        [*FB[:-1], "run", "--host", lab_host.name, "--playbook", str(playbook), "--inventory",
         str(inventory_file), "--repo", str(lab_repo.path), "--good", lab_repo.good, "--bad", lab_repo.bad,
         "--run-dir", str(run_dir), "--no-endpoint-check", "--hook", f"verdict={fill}"],
        capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 128, p.stderr[-2000:]
    assert "disk full" in p.stderr and "fleetbisect resume" in p.stderr
    assert "Traceback" not in p.stderr
    (small_disk / "ballast").unlink()
    resumed = subprocess.run([*FB[:-1], "resume", str(run_dir)], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"first bad commit: {lab_repo.shas[CULPRIT]}" in resumed.stdout
    events = journal(run_dir)  # every line whole: a torn one was dropped with a note on resume
    marks = [e["commit"] for e in events if e["event"] == "marked"]
    assert len(marks) == len(set(marks))
