"""A build's log never holds a secret, not even while it runs or after the controller was
SIGKILLed; a build a dead controller left behind does not live on.

These run real processes (sh, sleep, a controller in a subprocess): the thing under test is
what the kernel and the file system end up holding, which no fake can show.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fleetbisect import masking
from fleetbisect.deadline import Deadline
from fleetbisect.localexec import kill_orphan, run_logged
from fleetbisect.stages.build import kill_orphan_build

BUILD_SECRET = "pl4ybook-s3cret-value"  # a build.env value; its name does not look secret
BMC_SECRET = "bmc-hunter2-pass"  # BMC_PASS in the controller's environment
READY = b"\nREADY\n"  # a line of output; the command line at the top of the log says "echo READY"
PATIENCE = 120.0  # only to fail instead of hanging when something is broken; never asserted


@pytest.fixture(autouse=True)
def clean_mask():
    masking._values.clear()
    yield
    masking._values.clear()


@pytest.fixture
def reaper():
    """Processes the test started, and process groups it may leave: killed by id at the end."""
    procs: list[subprocess.Popen] = []
    groups: list[int] = []
    yield procs, groups
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def until(condition, what: str):
    """Wait for a condition that the test's processes make true (not for time to pass)."""
    deadline = Deadline.after(PATIENCE)
    while not condition():
        if deadline.expired:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper (PID 1 here may be slow to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def secrets_under(root: Path, *secrets: str) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def test_the_log_is_masked_while_the_command_runs(tmp_path):
    masking.register({"BMC_PASS": BMC_SECRET})
    log_path, release = tmp_path / "build.log", tmp_path / "release"
    os.mkfifo(release)
    script = f'echo "bmc $BMC_PASS"; echo READY; read x < {release}; echo done'
    env = {"BMC_PASS": BMC_SECRET, "PATH": os.environ["PATH"]}
    result = {}

    def run():
        with masking.open_masked(log_path, "wb") as log:
            result["status"] = run_logged(["sh", "-c", script], None, env, log, Deadline.after(PATIENCE))

    t = threading.Thread(target=run)
    t.start()
    try:
        until(lambda: log_path.exists() and READY in log_path.read_bytes(), "READY in the log")
        during = log_path.read_bytes()  # the command is still running: it waits on the fifo
        assert b"bmc ***" in during and BMC_SECRET.encode() not in during
    finally:
        with open(release, "w") as f:
            f.write("go\n")
        t.join()
    assert result["status"] == 0
    assert log_path.read_text().endswith("bmc ***\nREADY\ndone\n")


def test_a_silent_command_is_stopped_at_the_deadline_with_its_group(tmp_path):
    pidfile, log_path = tmp_path / "build.pid", tmp_path / "build.log"
    script = "echo pgid $(cut -d' ' -f5 /proc/$$/stat); sleep 3600 & sleep 3600"
    with masking.open_masked(log_path) as log:
        status = run_logged(["sh", "-c", script], None, dict(os.environ), log, Deadline.after(1), pidfile)
    assert status is None
    assert not pidfile.exists()
    pgid = int(log_path.read_text().split("\npgid ")[1].split()[0])  # the output line, not the command
    until(lambda: not [p for p in _group(pgid) if alive(p)], "the whole group gone")


def _group(pgid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[2]) == pgid:
            out.append(int(entry.name))
    return out


def test_a_recycled_pid_is_never_killed(tmp_path):
    proc = subprocess.Popen(["sleep", "3600"], start_new_session=True)
    try:
        pidfile = tmp_path / "build.pid"
        pidfile.write_text(f"{proc.pid} 1 deadbeef\n")  # same pid, another process's start time
        assert kill_orphan(pidfile) == []
        assert proc.poll() is None and not pidfile.exists()
    finally:
        proc.kill()
        proc.wait()


CONTROLLER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from fleetbisect import localexec
    from fleetbisect.config.playbook import load_playbook
    from fleetbisect.deadline import Deadline
    from fleetbisect.stages.build import build

    playbook, tree, log, guard = sys.argv[1:5]
    if guard == "no-pdeathsig":  # a controller the kernel cannot signal for: resume must kill
        localexec.SETPRIV = None
    build(Path(tree), load_playbook(Path(playbook)), "0" * 40, Path(log), Deadline.after(3600))
""")


def _start_controller(tmp_path: Path, guard: str, reaper):
    """A controller process running build() with a secret in build.env and BMC_PASS in its
    environment; returns it once the build printed both (masked) and started a sleeper."""
    tree = tmp_path / "tree"
    tree.mkdir()
    config = tmp_path / "config"  # the user's own files: the playbook holds the secret
    config.mkdir()
    playbook = config / "pb.yaml"
    playbook.write_text(textwrap.dedent(f"""\
        name: secrets
        build:
          env: {{SIGN_WITH: {BUILD_SECRET}}}
          localversion: false
          command: |
            echo "env $SIGN_WITH"
            echo "bmc $BMC_PASS" >&2
            sleep 3600 &
            echo $! > sleeper.pid
            echo READY
            wait
        reproducer: {{kind: command, command: 'true', timeout: 10s}}
        """))
    step_dir = tmp_path / "run" / "steps" / "001-000000000000"
    log = step_dir / "build.log"
    script = config / "controller.py"
    script.write_text(CONTROLLER)
    env = {**os.environ, "BMC_PASS": BMC_SECRET}
    controller = subprocess.Popen([sys.executable, str(script), str(playbook), str(tree), str(log), guard],
                                  env=env, stdin=subprocess.DEVNULL)
    reaper[0].append(controller)
    until(lambda: log.exists() and READY in log.read_bytes() or controller.poll() is not None,
          "READY in build.log")
    assert controller.poll() is None, "the controller died before the build ran"
    build_pgid = int((step_dir / "build.pid").read_text().split()[0])
    reaper[1].append(build_pgid)  # only if the test fails: the build must be gone by then
    sleeper = int((tree / "sleeper.pid").read_text())
    return controller, build_pgid, sleeper, log


def _written(tmp_path: Path) -> list[str]:
    """Secrets in anything the controller or the build wrote (all but the user's config)."""
    return secrets_under(tmp_path / "run", BUILD_SECRET, BMC_SECRET) + \
        secrets_under(tmp_path / "tree", BUILD_SECRET, BMC_SECRET)


def test_sigkill_of_the_controller_mid_build_leaves_no_secret_and_no_build(tmp_path, reaper):
    controller, guard_pid, sleeper, log = _start_controller(tmp_path, "pdeathsig", reaper)
    assert alive(guard_pid) and alive(sleeper)
    controller.kill()
    controller.wait()
    until(lambda: not alive(sleeper) and not alive(guard_pid), "the build died with its controller")
    assert _written(tmp_path) == []
    text = log.read_text()
    assert "env ***" in text and "bmc ***" in text


def test_a_build_that_outlived_its_controller_is_killed_when_the_run_resumes(tmp_path, reaper):
    controller, guard_pid, sleeper, log = _start_controller(tmp_path, "no-pdeathsig", reaper)
    controller.kill()
    controller.wait()
    assert alive(sleeper)  # nothing told it: only the pid file can find it now
    killed = kill_orphan_build(tmp_path / "run")
    assert killed == [guard_pid]
    until(lambda: not alive(sleeper) and not alive(guard_pid), "the orphaned build was killed")
    assert not (log.parent / "build.pid").exists()
    assert _written(tmp_path) == []


def test_the_guard_is_set_up_without_a_preexec_fn(tmp_path, monkeypatch):
    """With a preexec_fn, CPython runs its at-fork handlers in the controller, and a Ctrl-C that
    lands in one is swallowed ("Exception ignored in _releaseLock"): seen as a resumed run that
    ignored Ctrl-C and waited out its build. The guard gets PR_SET_PDEATHSIG from setpriv."""
    import subprocess

    from fleetbisect import localexec
    from fleetbisect.masking import open_masked

    seen = {}
    real = subprocess.Popen

    def spy(argv, **kw):
        seen.update(kw, argv=argv)
        return real(argv, **kw)

    monkeypatch.setattr(localexec.subprocess, "Popen", spy)
    with open_masked(tmp_path / "log", "wb") as log:
        assert localexec.run_logged(["true"], None, {}, log, Deadline.after(60)) == 0
    assert seen.get("preexec_fn") is None
    assert seen["argv"][:3] == [localexec.SETPRIV, "--pdeathsig", "HUP"]
