"""The fleet on the lab: `fleetbisect demo --hosts 3` (three VM hosts, each its own sshd and
QEMU, bisecting one generated repo together) and `fleetbisect demo --scenario flaky` (the
network hangs on some boots only) both find the seeded culprit. Small repos: few steps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FB = [sys.executable, "-m", "fleetbisect"]


def seeded(tmp_path) -> str:
    return subprocess.run(["git", "-C", str(tmp_path / "linux"), "log", "--format=%H",
                           "--grep=Seeded-regression: true"], capture_output=True, text=True,
                          check=True).stdout.split()[0]


def demo(tmp_path, *args: str, timeout: float = 1200) -> tuple[str, dict]:
    """`fleetbisect demo ARGS` in tmp_path, which must find the seeded culprit: it and the report."""
    p = subprocess.run([*FB, "demo", *args, "--dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    culprit = seeded(tmp_path)
    assert f"first bad commit: {culprit}" in p.stdout
    return culprit, json.loads((tmp_path / "run" / "report.json").read_text())


@pytest.mark.slow  # a whole bisect: out of the default run, once in CI (.ci/run)
def test_demo_three_hosts_find_the_seeded_culprit(assets, tmp_path):
    culprit, report = demo(tmp_path, "--hosts", "3", "--commits", "16", "--seed", "5")
    assert report["search"] == "kary" and report["culprit"] == culprit and report["confirmed"] is True
    assert {s["host"] for s in report["steps"]} == {"lab-host", "lab-host2", "lab-host3"}
    events = [json.loads(ln) for ln in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    assert all(e.get("host") for e in events if e["event"] == "step-started")
    # Each host built in a worktree of its own, removed at the end; the repo is left as it was.
    assert not (tmp_path / "run" / "worktrees").exists() or not any((tmp_path / "run" / "worktrees").iterdir())
    status = subprocess.run([*FB, "status", str(tmp_path / "run")], capture_output=True, text=True)
    for host in ("lab-host", "lab-host2", "lab-host3"):
        assert f"  {host}: " in status.stdout, status.stdout


@pytest.mark.slow  # a whole bisect: out of the default run, once in CI (.ci/run)
def test_demo_flaky_finds_the_seeded_culprit_with_its_confidence(assets, tmp_path):
    culprit, report = demo(tmp_path, "--scenario", "flaky", "--hosts", "2", "--commits", "10", "--seed", "3",
                           timeout=2400)
    assert report["search"] == "bayes" and report["culprit"] == culprit
    assert report["search_answer"]["confidence"] >= 0.99
    cal = report["calibration"]
    assert cal["runs"] == 6 and cal["good_runs"] == 3 and cal["failures"] >= 1
    # Each run is its own boot: a commit tested several times has a step (a boot) per run.
    per_commit = {}
    for s in report["steps"]:
        per_commit[s["commit"]] = per_commit.get(s["commit"], 0) + 1
    assert per_commit[report["bad"]] == 6
    md = (tmp_path / "run" / "report.md").read_text()
    assert "hit rate on the bad end" in md and "runner-up" in md


@pytest.mark.slow  # a whole bisect: out of the default run, once in CI (.ci/run)
def test_demo_one_host_two_slots_runs_two_vms_at_once(assets, tmp_path):
    culprit, report = demo(tmp_path, "--slots", "2", "--commits", "16", "--seed", "5")
    assert report["search"] == "kary" and report["culprit"] == culprit and report["confirmed"] is True
    assert {s["host"] for s in report["steps"]} == {"lab-host", "lab-host#2"}
    # Each slot booted its own QEMU from its own directory, on its own forwarded port.
    work = tmp_path / "host" / "work"
    assert (work / "vm" / "console.log").exists() and (work / "slot-2" / "vm" / "console.log").exists()
    ports = {w.split("hostfwd=tcp:127.0.0.1:")[1].split("-")[0]
             for f in (tmp_path / "run" / "steps").glob("*/commands.txt") for w in f.read_text().split()
             if "hostfwd=" in w}
    assert len(ports) == 2, ports
    # At some moment both VMs ran: a step on one slot started before the other's finished.
    events = [json.loads(ln) for ln in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    running, overlapped = set(), False
    for e in events:
        if e["event"] == "step-started":
            running.add(e["host"])
            overlapped |= running == {"lab-host", "lab-host#2"}
        elif e["event"] in ("step-finished", "step-cancelled"):
            running.discard(e["host"])
    assert overlapped
