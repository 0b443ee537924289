"""SSHRemote against a real OpenSSH sshd on loopback (the lab host)."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fleetbisect.deadline import Deadline
from fleetbisect.lab.vmhost import LabHost, free_port
from fleetbisect.remote.base import (
    CommandTimedOut,
    ConnectFailed,
    HostKeyError,
    RemoteCommandFailed,
    RemoteError,
    TransferTimedOut,
)
from fleetbisect.remote.ssh import SSHRemote


def wait_until(predicate, seconds: float, what: str) -> None:
    """Poll `predicate` until true; fail after `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"{what}: not within {seconds}s")


class Pattern(io.RawIOBase):
    """`size` bytes of incompressible data, generated on the fly."""

    def __init__(self, size: int, seed: int = 1):
        self.left = size
        self.block = hashlib.sha256(str(seed).encode()).digest() * 32768  # 1 MiB

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        out = (self.block * (n // len(self.block) + 1))[:n]
        self.left -= n
        return out


# --- commands -----------------------------------------------------------------------------


def test_run_returns_stdout_stderr_and_status(ssh):
    res = ssh.run("echo out; echo err >&2; exit 3", deadline=Deadline.after(10))
    assert (res.exit_status, res.stdout, res.stderr) == (3, "out\n", "err\n")
    assert not res.ok and res.command == "echo out; echo err >&2; exit 3"
    assert ssh.run(["true"], deadline=Deadline.after(10)).ok


def test_check_raises_on_non_zero_exit(ssh):
    with pytest.raises(RemoteCommandFailed) as info:
        ssh.run(["sh", "-c", "echo broken >&2; exit 4"], deadline=Deadline.after(10), check=True)
    assert info.value.result.exit_status == 4
    assert "broken" in str(info.value)


def test_list_arguments_survive_quoting(ssh):
    args = ["a b", "it's", "$HOME", '"double"', "back\\slash", "semi;colon", "*", ""]
    res = ssh.run(["printf", "%s|", *args], deadline=Deadline.after(10), check=True)
    assert res.stdout == "".join(a + "|" for a in args)


def test_stdin_is_fed_while_output_is_read(ssh):
    # 3 MB in and 3 MB out at the same time: more than either side's window, so feeding
    # stdin without reading stdout would deadlock.
    data = b"".join(b"line %07d\n" % i for i in range(300_000))
    res = ssh.run("cat; echo done >&2", deadline=Deadline.after(30), stdin=data)
    assert res.ok and res.stderr == "done\n"
    assert res.stdout.startswith("[... ") and "bytes dropped" in res.stdout.splitlines()[0]
    assert res.stdout.endswith(data[-100_000:].decode())
    res = ssh.run("sha256sum", deadline=Deadline.after(30), stdin=data, check=True)
    assert res.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_output_is_capped_and_utf8_decoded(ssh):
    res = ssh.run("head -c 5000000 /dev/zero | tr '\\0' x; printf '\\377 caf\\303\\251'",
                  deadline=Deadline.after(30), check=True)
    assert len(res.stdout) < 1_100_000
    assert res.stdout.endswith("\ufffd café")


def test_timeout_stops_the_remote_command_too(ssh, tmp_path):
    pidfile = tmp_path / "sleeper.pid"
    started = time.monotonic()
    with pytest.raises(CommandTimedOut) as info:
        ssh.run(f"echo started; echo $$ > {pidfile}; exec sleep 60", deadline=Deadline.after(2))
    assert time.monotonic() - started >= 1.9  # the deadline fired, not an early error
    assert info.value.partial is not None and info.value.partial.stdout == "started\n"
    pid = int(pidfile.read_text())
    # the lab host is this machine: the remote process is visible here. `timeout -k` on the
    # remote side ends it (closing the channel alone would leave `sleep 60` running).
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or
               Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"),
               10, f"remote sleep (pid {pid}) still running")
    # the connection is still good after a command timed out
    assert ssh.run(["echo", "alive"], deadline=Deadline.after(10)).stdout == "alive\n"


def test_expired_deadline_raises_without_running(ssh):
    with pytest.raises(CommandTimedOut):
        ssh.run(["true"], deadline=Deadline.after(0))


# --- connecting ---------------------------------------------------------------------------


def test_unknown_host_key_is_refused(lab_host, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    params = replace(lab_host.ssh_params(), known_hosts=(str(empty),))
    with pytest.raises(HostKeyError) as info:
        SSHRemote.connect(params, deadline=Deadline.after(10))
    msg = str(info.value)
    assert "unknown host key" in msg and str(empty) in msg
    assert f"[127.0.0.1]:{lab_host.port}" in msg and "SHA256:" in msg
    # a missing known_hosts file counts as empty
    params = replace(params, known_hosts=(str(tmp_path / "missing"),))
    with pytest.raises(HostKeyError):
        SSHRemote.connect(params, deadline=Deadline.after(10))


def test_mismatched_host_key_is_refused(lab_host, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{lab_host.port} " + " ".join(Path(f"{other}.pub").read_text().split()[:2]) + "\n")
    params = replace(lab_host.ssh_params(), known_hosts=(str(kh),))
    with pytest.raises(HostKeyError) as info:
        SSHRemote.connect(params, deadline=Deadline.after(10))
    assert "MISMATCH" in str(info.value) and str(kh) in str(info.value)
    # the same through explicit host_keys (a guest key baked into an image)
    wrong = replace(lab_host.ssh_params(), known_hosts=(), host_keys=(Path(f"{other}.pub").read_text(),))
    with pytest.raises(HostKeyError):
        SSHRemote.connect(wrong, deadline=Deadline.after(10))
    right = replace(wrong, host_keys=(lab_host.host_public_key,))
    with SSHRemote.connect(right, deadline=Deadline.after(10)) as remote:
        assert remote.run(["true"], deadline=Deadline.after(10)).ok


def test_closed_port_fails_with_the_refusal(lab_host):
    # a refused connection is reported as such at once, not waited out as a timeout
    params = replace(lab_host.ssh_params(), port=free_port())
    with pytest.raises(ConnectFailed) as info:
        SSHRemote.connect(params, deadline=Deadline.after(60))
    assert "refused" in str(info.value).lower() and "timed out" not in str(info.value)


def test_silent_port_fails_at_the_deadline(lab_host):
    # something listens but never speaks SSH: the banner wait is bounded by the deadline
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        params = replace(lab_host.ssh_params(), port=server.getsockname()[1])
        started = time.monotonic()
        with pytest.raises(ConnectFailed) as info:
            SSHRemote.connect(params, deadline=Deadline.after(2))
        assert time.monotonic() - started >= 1.9  # it waited for the banner until the deadline
        assert "timed out" in str(info.value)


def test_wrong_key_fails_authentication(lab_host, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    params = replace(lab_host.ssh_params(), key_files=(str(other),))
    with pytest.raises(ConnectFailed) as info:
        SSHRemote.connect(params, deadline=Deadline.after(10))
    assert "authentication" in str(info.value) and "PRIVATE" not in str(info.value)


def test_alias_resolved_through_ssh_config(lab_host, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        f"Host lab-alias\n  HostName 127.0.0.1\n  Port {lab_host.port}\n"
        f"  User {lab_host.user}\n  IdentityFile {lab_host.user_key}\n"
    )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    from fleetbisect.remote.base import SSHParams

    params = SSHParams(name="aliased", alias="lab-alias", known_hosts=(str(lab_host.known_hosts),))
    with SSHRemote.connect(params, deadline=Deadline.after(10)) as remote:
        assert remote.endpoint.port == lab_host.port
        assert remote.run(["echo", "hi"], deadline=Deadline.after(10)).stdout == "hi\n"


def test_guest_reached_through_a_tunnel(ssh, lab_host):
    # the "guest" is the same sshd, reached through a direct-tcpip channel of the host
    sock = ssh.open_tunnel("127.0.0.1", lab_host.port, Deadline.after(10))
    guest_params = lab_host.ssh_params(name="lab-host/guest")
    with SSHRemote.connect(guest_params, deadline=Deadline.after(10), sock=sock) as guest:
        res = guest.run(["echo", "via tunnel"], deadline=Deadline.after(10), check=True)
        assert res.stdout == "via tunnel\n"
    with pytest.raises(ConnectFailed):
        ssh.open_tunnel("127.0.0.1", free_port(), Deadline.after(5))


def test_gcm_cipher_is_negotiated(ssh):
    assert ssh._live(Deadline.after(5)).local_cipher == "aes128-gcm@openssh.com"


# --- files --------------------------------------------------------------------------------


def test_put_put_stream_get_round_trip(ssh, tmp_path):
    data = os.urandom(3 * (1 << 20) + 12345)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    seen = []
    stats = ssh.put(src, str(tmp_path / "a.bin"), deadline=Deadline.after(30), progress=seen.append)
    assert stats.bytes == len(data) and seen[-1] == len(data)
    assert hashlib.sha256((tmp_path / "a.bin").read_bytes()).digest() == hashlib.sha256(data).digest()

    ssh.put_stream(io.BytesIO(data), len(data), str(tmp_path / "b.bin"), deadline=Deadline.after(30))
    back = tmp_path / "back.bin"
    stats = ssh.get(str(tmp_path / "b.bin"), back, deadline=Deadline.after(30))
    assert stats.bytes == len(data)
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data).digest()
    # empty files too
    ssh.put_stream(io.BytesIO(b""), 0, str(tmp_path / "empty"), deadline=Deadline.after(10))
    assert (tmp_path / "empty").read_bytes() == b""


def test_rename_replaces_atomically_over_sftp_and_without_it(ssh, tmp_path):
    (tmp_path / "part").write_text("new")
    (tmp_path / "blob").write_text("old")
    ssh.rename(str(tmp_path / "part"), str(tmp_path / "blob"), deadline=Deadline.after(10))
    assert (tmp_path / "blob").read_text() == "new" and not (tmp_path / "part").exists()
    with pytest.raises(RemoteError, match="rename"):  # nothing to rename
        ssh.rename(str(tmp_path / "part"), str(tmp_path / "blob"), deadline=Deadline.after(10))
    ssh._no_sftp, ssh._sftp = True, None  # a host without an SFTP subsystem: `mv -f`
    (tmp_path / "part").write_text("newer")
    ssh.rename(str(tmp_path / "part"), str(tmp_path / "blob"), deadline=Deadline.after(10))
    assert (tmp_path / "blob").read_text() == "newer" and not (tmp_path / "part").exists()


def test_transfer_errors_are_remote_errors(ssh, tmp_path):
    src = tmp_path / "x"
    src.write_bytes(b"x")
    with pytest.raises(RemoteError) as info:
        ssh.put(src, str(tmp_path / "no" / "such" / "dir"), deadline=Deadline.after(10))
    assert not isinstance(info.value, TransferTimedOut)
    with pytest.raises(RemoteError):
        ssh.get(str(tmp_path / "missing"), tmp_path / "out", deadline=Deadline.after(10))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.part").exists()
    # the connection is fine afterwards
    assert ssh.run(["true"], deadline=Deadline.after(10)).ok


def _process_for_connection(lab_host: LabHost, remote: SSHRemote, name: str) -> int:
    """PID of the `name` process serving this connection (matched by SSH_CLIENT's port)."""
    client_port = remote._transport.sock.getsockname()[1]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if name.encode() in cmdline and any(
            e.startswith(b"SSH_CLIENT=") and e.split()[1] == str(client_port).encode() for e in environ
        ):
            return int(entry)
    raise AssertionError(f"no {name} process for client port {client_port}")


def test_upload_into_a_stopped_sftp_server_times_out(ssh, lab_host, tmp_path):
    ssh.put_stream(io.BytesIO(b"warm"), 4, str(tmp_path / "warm"), deadline=Deadline.after(10))
    pid = _process_for_connection(lab_host, ssh, "sftp-server")
    stopped = []

    def progress(done: int) -> None:
        if done >= 8 << 20 and not stopped:  # the server stops mid-transfer
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

    size = 1 << 30
    try:
        started = time.monotonic()
        with pytest.raises(TransferTimedOut) as info:
            ssh.put_stream(Pattern(size), size, str(tmp_path / "big"), deadline=Deadline.after(3),
                           progress=progress)
        assert stopped
        assert time.monotonic() - started >= 2.9  # ended by the deadline, not by an error
        assert 8 << 20 <= info.value.bytes_done < size
    finally:
        os.kill(pid, signal.SIGCONT)
    # the connection was dropped; the next call reconnects
    assert ssh.run(["echo", "back"], deadline=Deadline.after(10)).stdout == "back\n"


class Relay:
    """A TCP relay to the lab sshd that can freeze: it stops reading from either side, like a
    guest whose network died mid-transfer (no RST, no FIN: the sender just stalls)."""

    def __init__(self, upstream_port: int, rcvbuf: int | None = None):
        self.server = socket.socket()
        if rcvbuf:
            self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.port = self.server.getsockname()[1]
        self.upstream_port = upstream_port
        self.running = threading.Event()
        self.running.set()
        self.stopped = False
        self.socks: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        try:
            client, _ = self.server.accept()
        except OSError:
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self.socks += [client, upstream]
        for a, b in ((client, upstream), (upstream, client)):
            t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self.running.wait()
                if self.stopped:
                    return
                data = src.recv(65536)
                if not data:
                    return
                self.running.wait()
                if self.stopped:
                    return
                dst.sendall(data)
        except OSError:
            return

    def freeze(self) -> None:
        self.running.clear()

    def close(self) -> None:
        self.stopped = True
        self.running.set()
        for s in [self.server, *self.socks]:
            s.close()
        for t in self.threads:
            t.join(timeout=5)


@pytest.mark.parametrize("small_buffers", [False, True], ids=["window-stall", "tcp-stall"])
def test_upload_through_a_stalled_network_times_out(lab_host, tmp_path, small_buffers):
    # window-stall: TCP buffers hold more than the SSH window, so the sender waits for window
    # space (a channel timeout). tcp-stall: tiny socket buffers, so paramiko blocks inside a
    # socket write where no channel timeout reaches: the watchdog must cut the connection.
    relay = Relay(lab_host.port, rcvbuf=4096 if small_buffers else None)
    try:
        params = replace(lab_host.ssh_params(), port=relay.port, known_hosts=(),
                         host_keys=(lab_host.host_public_key,))
        sock = None
        if small_buffers:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock.connect(("127.0.0.1", relay.port))
        remote = SSHRemote.connect(params, deadline=Deadline.after(10), sock=sock)
        try:
            def progress(done: int) -> None:
                if done >= 16 << 20:
                    relay.freeze()

            size = 1 << 30
            started = time.monotonic()
            with pytest.raises(TransferTimedOut) as info:
                remote.put_stream(Pattern(size), size, str(tmp_path / "big"),
                                  deadline=Deadline.after(4), progress=progress)
            assert time.monotonic() - started >= 3.9  # ended by the deadline, not by an error
            assert 16 << 20 <= info.value.bytes_done < size
            # a tunnelled/handed-in socket cannot be reopened: later calls fail cleanly
            if small_buffers:
                with pytest.raises(RemoteError):
                    remote.run(["true"], deadline=Deadline.after(5))
        finally:
            remote.close()
    finally:
        relay.close()


def accepted_logins(lab_host) -> int:
    return lab_host.log.read_text(errors="replace").count("Accepted publickey")


def test_big_uploads_go_through_openssh_and_land_whole(lab_host, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1 << 20) * 20)  # above openssh.BULK
    remote = SSHRemote.connect(lab_host.ssh_params(), deadline=Deadline.after(15))
    try:
        before = accepted_logins(lab_host)
        stats = remote.put(big, str(tmp_path / "dst.bin"), deadline=Deadline.after(60))
        assert stats.bytes == big.stat().st_size
        assert (tmp_path / "dst.bin").read_bytes() == big.read_bytes()
        assert accepted_logins(lab_host) == before + 1  # OpenSSH's own login
    finally:
        remote.close()


def test_openssh_uploads_check_the_host_key_too(lab_host, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1 << 20) * 20)
    known = tmp_path / "known_hosts"
    known.write_text(lab_host.known_hosts.read_text())
    params = replace(lab_host.ssh_params(), known_hosts=(str(known),))
    remote = SSHRemote.connect(params, deadline=Deadline.after(15))
    try:
        # The host "changes its key" after paramiko checked it: OpenSSH must refuse, and the
        # upload goes over the connection that was verified, never a silently accepted one.
        other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9"
        known.write_text(f"[127.0.0.1]:{lab_host.port} {other}\n")
        before = accepted_logins(lab_host)
        remote.put(big, str(tmp_path / "dst.bin"), deadline=Deadline.after(60))
        assert accepted_logins(lab_host) == before
        assert (tmp_path / "dst.bin").read_bytes() == big.read_bytes()
    finally:
        remote.close()
