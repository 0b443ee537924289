"""The agent client against the real qemu-ga (Debian's, in unix-listen mode on this machine,
which is also the lab host), reached the way a step reaches it: through a relay started over
the lab host's real sshd. No VM: the protocol, the relays and the deadlines, fast."""

from __future__ import annotations

import io
import os
import signal
import subprocess
from pathlib import Path

import pytest

from fleetbisect.deadline import Deadline
from fleetbisect.lab.agent import qemu_ga
from fleetbisect.remote.agent import AgentError, AgentRemote, StreamTransport, relay_argv, relay_opener
from fleetbisect.remote.base import CommandTimedOut, RemoteError


class QemuGA:
    """qemu-ga listening on a unix socket, stopped by PID (tracked, reaped)."""

    def __init__(self, base: Path):
        base.mkdir(parents=True, exist_ok=True)
        self.socket = str(base / "qga.sock")
        self.proc = subprocess.Popen(
            [str(qemu_ga()), "-m", "unix-listen", "-p", self.socket, "-f", str(base / "qga.pid"),
             "-t", str(base), "-l", str(base / "qga.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.log = base / "qga.log"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def qga(tmp_path):
    agents = []

    def start(dirname: str = "qga") -> QemuGA:
        agents.append(QemuGA(tmp_path / dirname))
        return agents[-1]

    yield start
    for a in agents:
        a.stop()


def connect(ssh, sock: str, seconds: float = 10) -> AgentRemote:
    """The way the qemu target logs in: a short attempt, again until the agent listens."""
    deadline = Deadline.after(seconds)
    while True:
        try:
            return AgentRemote.connect(StreamTransport("lab/guest", relay_opener(ssh, sock)),
                                       deadline=deadline.sub(2))
        except RemoteError:
            if deadline.expired:
                raise


def test_commands_through_socat_on_the_host(ssh, qga):
    agent = qga()
    guest = connect(ssh, agent.socket)
    try:
        res = guest.run(["uname", "-r"], deadline=Deadline.after(10))
        assert res.exit_status == 0 and res.stdout == os.uname().release + "\n"
        res = guest.run("echo out; echo err >&2; exit 3", deadline=Deadline.after(10))
        assert (res.exit_status, res.stdout, res.stderr) == (3, "out\n", "err\n")
        res = guest.run(["sh", "-c", "tr a-z A-Z"], deadline=Deadline.after(10), stdin=b"through the agent")
        assert res.stdout == "THROUGH THE AGENT"
        res = guest.run(["sh", "-c", 'printf %s "$1"', "sh", "it's; $(not run)"], deadline=Deadline.after(10))
        assert res.stdout == "it's; $(not run)"  # argv words stay words
    finally:
        guest.close()


def test_the_python_relay_serves_a_socket_path_socat_cannot_parse(ssh, qga):
    agent = qga("q,g:a")  # socat would read `,` and `:` as address syntax
    assert relay_argv(agent.socket)[-1] == ""
    guest = connect(ssh, agent.socket)
    try:
        assert guest.run(["echo", "via python"], deadline=Deadline.after(10)).stdout == "via python\n"
    finally:
        guest.close()


def test_a_command_past_its_deadline_is_stopped_in_the_guest_too(ssh, qga, tmp_path):
    agent = qga()
    guest = connect(ssh, agent.socket)
    pidfile = tmp_path / "pid"
    try:
        with pytest.raises(CommandTimedOut):
            guest.run(["sh", "-c", 'echo $$ > "$1"; exec sleep 60', "sh", str(pidfile)], deadline=Deadline.after(1))
        # The same session goes on (resynchronised), and `timeout` ended the command in the
        # guest: it is gone long before its 60 s were up.
        pid = pidfile.read_text().strip()
        res = guest.run(["sh", "-c", 'while kill -0 "$1" 2>/dev/null; do sleep 0.1; done; echo gone', "sh", pid],
                        deadline=Deadline.after(30))
        assert res.stdout == "gone\n"
    finally:
        guest.close()


def test_files_up_and_down(ssh, qga, tmp_path):
    agent = qga()
    guest = connect(ssh, agent.socket)
    data = os.urandom(3 * (1 << 20) + 12345)
    try:
        stats = guest.put_stream(io.BytesIO(data), len(data), str(tmp_path / "up"), deadline=Deadline.after(60))
        assert stats.bytes == len(data) and (tmp_path / "up").read_bytes() == data
        back = guest.get(str(tmp_path / "up"), tmp_path / "down", deadline=Deadline.after(60))
        assert back.bytes == len(data) and (tmp_path / "down").read_bytes() == data
        with pytest.raises(AgentError, match="No such file"):
            guest.get(str(tmp_path / "missing"), tmp_path / "none", deadline=Deadline.after(10))
        assert not (tmp_path / "none").exists() and not (tmp_path / "none.part").exists()
    finally:
        guest.close()


def test_no_agent_behind_the_socket_is_a_remote_error_within_the_deadline(ssh, tmp_path):
    transport = StreamTransport("lab/guest", relay_opener(ssh, str(tmp_path / "nothing.sock")))
    with pytest.raises(RemoteError, match="nothing.sock") as e:
        AgentRemote.connect(transport, deadline=Deadline.after(5))
    assert not isinstance(e.value, CommandTimedOut)


def test_an_agent_that_dies_mid_command_is_a_remote_error(ssh, qga):
    agent = qga()
    guest = connect(ssh, agent.socket)
    try:
        pid = guest.agent.exec("/bin/sh", ["-c", "sleep 30"], Deadline.after(10))
        agent.stop()
        # noticed when the channel ended (wait() returns None at its deadline, never raises)
        with pytest.raises(RemoteError) as e:
            guest.agent.wait(pid, Deadline.after(20))
        assert not isinstance(e.value, CommandTimedOut)
    finally:
        guest.close()
