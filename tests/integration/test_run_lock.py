"""One controller per run directory and per VM, with real processes: a second `resume` of a live
run is refused (the run-directory lock), `status` says it runs; once the first is SIGKILLed the
next `resume` takes the run over (lock and host lease); `step` holds the host lease too."""

from __future__ import annotations

import os
import posixpath
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .test_resume_lab import FB, Controller, journal

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9 guest"


@pytest.fixture
def small_repo(tmp_path) -> tuple[Path, list[str]]:
    repo = tmp_path / "linux"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    git("init", "-q")
    shas = []
    for i in range(4):
        (repo / "file").write_text(f"{i}\n")
        git("add", "file")
        git("-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-q", "-m", f"commit {i}")
        shas.append(git("rev-parse", "HEAD"))
    return repo, shas


@pytest.fixture
def inventory(lab_host, tmp_path) -> tuple[Path, str]:
    work = str(tmp_path / "work")
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump({"hosts": {lab_host.name: {
        "ssh": {"address": "127.0.0.1", "port": lab_host.port, "user": lab_host.user,
                "key": str(lab_host.user_key), "known_hosts": str(lab_host.known_hosts)},
        "work_dir": work,
        "target": {"kind": "qemu", "guest": {"port": 2, "host_key": KEY}},
    }}}))
    return path, work


@dataclass
class Go:
    command: str  # a build command that waits for `flag`, then fails
    flag: Path


@pytest.fixture
def go(tmp_path):
    """A build that waits until the test lets it go: it holds its controller in the build stage
    for as long as the test needs, and ends (failing) once the test touches the flag, at the
    latest when the test is over."""
    flag = tmp_path / "go"
    try:
        yield Go(f"while [ ! -e {flag} ]; do sleep 0.1; done; exit 1", flag)
    finally:
        flag.touch()


def fb(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*FB[:-1], *args], capture_output=True, text=True, timeout=timeout)


def building(event) -> bool:
    return event["event"] == "stage-started" and event["stage"] == "build"


def stop(controller: Controller, sig: int) -> None:
    os.killpg(controller.proc.pid, sig)
    controller.proc.wait(timeout=120)


@pytest.mark.timeout(600)
def test_a_second_controller_is_refused_while_the_first_lives_and_takes_over_once_it_is_killed(
    small_repo, inventory, lab_host, playbook_variant, go, tmp_path
):
    repo, shas = small_repo
    inv, work = inventory
    _, playbook = playbook_variant({"build": {"command": go.command, "timeout": "5m"}, "policy": {"confirm": 0}})
    run_dir = tmp_path / "run"
    first = Controller("run", "--host", lab_host.name, "--playbook", str(playbook), "--inventory", str(inv),
                       "--repo", str(repo), "--good", shas[0], "--bad", shas[-1], "--run-dir", str(run_dir),
                       "--no-endpoint-check")
    try:
        first.wait_for(building)  # it holds the run directory and the host's lease
        before = (run_dir / "journal.jsonl").read_bytes()
        for argv in (["resume", str(run_dir)],
                     ["run", "--host", lab_host.name, "--playbook", str(playbook), "--inventory", str(inv),
                      "--repo", str(repo), "--good", shas[0], "--bad", shas[-1], "--run-dir", str(run_dir)]):
            second = fb(*argv)
            assert second.returncode == 2, second.stderr
            assert (f"{run_dir} is driven by a live controller (pid {first.proc.pid} on "
                    f"{socket.gethostname()}") in second.stderr
            assert "Traceback" not in second.stderr
        assert (run_dir / "journal.jsonl").read_bytes() == before  # the second wrote nothing
        st = fb("status", str(run_dir))
        assert f"running (controller pid {first.proc.pid} on this machine)" in st.stdout, st.stdout
    finally:
        stop(first, signal.SIGKILL)
    st = fb("status", str(run_dir))
    assert f"stopped (controller pid {first.proc.pid} is not running)" in st.stdout, st.stdout

    third = Controller("resume", str(run_dir))
    try:
        third.wait_for(building)  # the killed controller's lock and lease were taken over
        lease = lab_host_lease(lab_host, work)
        run_id = journal(run_dir)[0]["config"]["run_id"]
        assert lease.split()[0] == run_id and lease.split()[2] == f"{socket.gethostname()}:{third.proc.pid}"
    finally:
        stop(third, signal.SIGINT)
    assert third.proc.returncode == 130
    events = journal(run_dir)
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["controller"]["pid"] == third.proc.pid
    assert events[-1]["event"] == "interrupted"
    assert not lab_host_lease(lab_host, work)  # released on the way out


def lab_host_lease(lab_host, work: str) -> str:
    path = Path(posixpath.join(work, "lease"))
    return path.read_text() if path.exists() else ""


def test_step_holds_the_host_lease_and_exits_128_when_another_controller_has_it(
    small_repo, inventory, lab_host, playbook_variant, tmp_path
):
    repo, _ = small_repo
    inv, work = inventory
    _, playbook = playbook_variant({"build": {"command": "exit 1"}})  # a quick skip when it runs
    args = ["step", "--host", lab_host.name, "--playbook", str(playbook), "--inventory", str(inv),
            "--repo", str(repo), "--evidence-dir", str(tmp_path / "evidence")]
    lease = Path(work) / "lease"
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_text(f"run-live {int(time.time()) + 3600} {socket.gethostname()}:{os.getpid()} tok\n")
    held = fb(*args)
    assert held.returncode == 128, held.stderr
    assert "is leased by run run-live" in held.stderr and "Traceback" not in held.stderr
    lease.unlink()
    free = fb(*args)
    assert free.returncode == 125, free.stderr  # the build failed: skip, under its own lease
    assert not lease.exists()  # released when the step ended


def test_a_run_that_loses_its_lease_stops_resumable_and_records_no_verdict(
    small_repo, inventory, lab_host, playbook_variant, go, tmp_path, monkeypatch
):
    import threading

    from fleetbisect import lease as lease_mod
    from fleetbisect.config.inventory import load_inventory
    from fleetbisect.errors import RunAborted
    from fleetbisect.run import start_run
    from fleetbisect.ui import UI

    repo, shas = small_repo
    inv, work = inventory
    # While the step builds, someone takes the lease away: the next renewal fails.
    thief = f"run-thief {int(time.time()) + 3600} elsewhere:1 othertoken"
    steal = f"printf '%s\\n' '{thief}' > {posixpath.join(work, 'lease')}; {go.command}"
    playbook, path = playbook_variant({"build": {"command": steal, "timeout": "5m"}, "policy": {"confirm": 0}})
    monkeypatch.setattr(lease_mod, "TTL", 3)  # renewals every second

    lost = threading.Event()

    class Watch(UI):
        def error(self, text: str) -> None:
            super().error(text)
            if "lost the lease on" in text:
                lost.set()

    run_dir, result = tmp_path / "run", {}

    def run():
        try:
            start_run(repo=repo, good=shas[0], bad=shas[-1], host=load_inventory([inv]).host(lab_host.name),
                      inventory=[inv], playbook=playbook, playbook_path=path, run_dir=run_dir,
                      ui=Watch(quiet=True), check_endpoints=False)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    assert lost.wait(300), "the lease was never found lost"
    go.flag.touch()  # let the build end (it fails: a skip, never recorded)
    t.join(300)
    assert isinstance(result.get("error"), RunAborted), result
    assert str(result["error"]).startswith(f"lost the lease on {lab_host.name}: ")
    assert "fleetbisect resume" in str(result["error"])
    events = journal(run_dir)
    assert not [e for e in events if e["event"] in ("step-finished", "marked")]  # no verdict recorded
    assert events[-1]["event"] == "run-finished" and events[-1]["status"] == "aborted"
    assert (Path(work) / "lease").read_text().split()[0] == "run-thief"  # the thief's lease untouched
