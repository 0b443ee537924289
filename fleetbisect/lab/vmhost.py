"""The lab's VM host: a real OpenSSH sshd on a free loopback port, with throwaway keys.

    with LabHost.start(Path("/tmp/lab/host")) as host:
        remote = SSHRemote.connect(host.ssh_params(), deadline=Deadline.after(10))

Everything it needs lives in `base_dir` (config, host key, user key, authorized_keys,
known_hosts, pid file, log). It logs in as the current user. `stop()` ends the sshd by PID
(and the per-connection sshd processes it forked, found by parent PID), and a finalizer does
the same if the object is dropped or the interpreter exits first: nothing outlives its owner.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path

from ..remote.base import SSHParams

SSHD = shutil.which("sshd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or "/usr/sbin/sshd"
# Measured (1 GiB uploads through paramiko, aes128-gcm, 255 KiB requests, 2 cores): the
# standalone sftp-server and internal-sftp are within noise of each other (medians 282-320 vs
# 293-300 MB/s). The standalone one is used when present: it keeps file I/O out of the sshd
# process (another core can write while sshd decrypts) and the tests can SIGSTOP it alone.
SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class LabHostError(RuntimeError):
    """The lab sshd could not be started; the message carries the tail of its log."""


def free_port(count: int = 1) -> int:
    """A free loopback port; with `count`, the first of that many free in a row (a host's
    slots forward consecutive guest ports)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count - 1 <= 65535 and all(_free(p) for p in range(base + 1, base + count)):
            return base
    raise LabHostError(f"no {count} free loopback ports in a row after 200 tries")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def sftp_subsystem() -> str:
    for path in SFTP_SERVER_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return "internal-sftp"


def _keygen(path: Path, comment: str) -> str:
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    path.chmod(0o600)
    return path.with_name(path.name + ".pub").read_text().strip()


def banner_ready(port: int, timeout: float = 0.5) -> bool:
    """True when 127.0.0.1:port answers with an SSH banner within `timeout`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while b"\n" not in data and len(data) < 256:
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"SSH-")
    except OSError:
        return False


def processes() -> list[tuple[int, int, int]]:
    """(pid, ppid, pgid) of every process, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the comm field may hold spaces or parentheses: state, ppid, pgrp follow the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2:
            found.append((int(entry), int(fields[1]), int(fields[2])))
    return found


def _children(pid: int, table: list[tuple[int, int, int]] | None = None) -> list[int]:
    """PIDs whose parent is `pid` (from /proc), depth first: the processes our sshd forked."""
    table = processes() if table is None else table
    found = []
    for child, ppid, _ in table:
        if ppid == pid:
            found.extend(_children(child, table))
            found.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_vms(base_dir: Path) -> None:
    """SIGKILL the QEMUs started through this host (they daemonize, so they are nobody's
    child): each named by a pidfile under `base_dir`, checked against /proc/PID/cmdline."""
    for pidfile in base_dir.rglob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(pidfile).encode() in cmdline:
            _signal(pid, signal.SIGKILL)


def _terminate(proc: subprocess.Popen, base_dir: Path | None = None, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the sshd and what it forked, wait up to `timeout`, then SIGKILL; reap it. Then
    the VMs it started, which outlive it."""
    try:
        _terminate_sshd(proc, timeout)
    finally:
        if base_dir is not None:
            _stop_vms(base_dir)


def _terminate_sshd(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        children = _children(proc.pid)
        _signal(proc.pid, signal.SIGTERM)
        for child in children:
            _signal(child, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal(proc.pid, signal.SIGKILL)
            proc.wait()
        for child in children:
            if Path(f"/proc/{child}").exists():
                _signal(child, signal.SIGKILL)
    else:
        proc.wait()


class LabHost:
    """A started sshd on 127.0.0.1; see the module docstring."""

    def __init__(self, name: str, base_dir: Path, port: int, user: str, proc: subprocess.Popen):
        self.name = name
        self.base_dir = base_dir
        self.port = port
        self.user = user
        self.user_key = base_dir / "id_ed25519"
        self.host_key = base_dir / "ssh_host_ed25519_key"
        # "ssh-ed25519 AAAA...": for SSHParams.host_keys (e.g. when reached through a relay)
        self.host_public_key = " ".join(
            (base_dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        )
        self.known_hosts = base_dir / "known_hosts"
        self.config = base_dir / "sshd_config"
        self.log = base_dir / "sshd.log"
        self._proc = proc
        self._finalizer = weakref.finalize(self, _terminate, proc, base_dir)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    @classmethod
    def start(cls, base_dir: Path, *, name: str = "lab-host", timeout: float = START_TIMEOUT,
              sftp: str | None = None, sshd_options: tuple[str, ...] = ()) -> "LabHost":
        """Start sshd; `sftp` overrides the SFTP subsystem (a sftp-server path or internal-sftp);
        `sshd_options` are sshd_config lines that win over the lab's (e.g. a host that refuses
        TCP forwarding: "AllowTcpForwarding no")."""
        base_dir = Path(base_dir).resolve()
        base_dir.mkdir(parents=True, exist_ok=True)
        try:
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # sshd's privsep dir
        except PermissionError:
            pass  # not root: sshd runs without privilege separation
        user = pwd.getpwuid(os.getuid()).pw_name
        _keygen(base_dir / "ssh_host_ed25519_key", f"{name}-host")
        user_pub = _keygen(base_dir / "id_ed25519", f"{name}-user")
        (base_dir / "authorized_keys").write_text(user_pub + "\n")
        (base_dir / "authorized_keys").chmod(0o600)
        host_pub = (base_dir / "ssh_host_ed25519_key.pub").read_text().split()
        last_error = ""
        for _ in range(3):  # a free port can be taken between probing and binding: retry
            port = free_port()
            proc = cls._launch(base_dir, port, sftp or sftp_subsystem(), sshd_options)
            host = cls(name, base_dir, port, user, proc)
            if host._wait_ready(timeout):
                (base_dir / "known_hosts").write_text(
                    f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n"
                )
                return host
            host.stop()
            last_error = host.log_tail()
            if "Address already in use" not in last_error:
                break
        raise LabHostError(f"lab sshd {name} did not start: {last_error or 'no log output'}")

    @staticmethod
    def _launch(base_dir: Path, port: int, sftp: str, options: tuple[str, ...] = ()) -> subprocess.Popen:
        config = base_dir / "sshd_config"
        config.write_text(
            "\n".join([
                *options,  # sshd takes the first value of a keyword: these win
                "ListenAddress 127.0.0.1",
                f"Port {port}",
                f"HostKey {base_dir / 'ssh_host_ed25519_key'}",
                f"PidFile {base_dir / 'sshd.pid'}",
                f"AuthorizedKeysFile {base_dir / 'authorized_keys'}",
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "AllowTcpForwarding yes",
                "X11Forwarding no",
                "PrintMotd no",
                "MaxSessions 64",
                "MaxStartups 64:30:128",
                "LogLevel INFO",
                f"Subsystem sftp {sftp}",
                "",
            ])
        )
        log = open(base_dir / "sshd.log", "ab")
        try:
            return subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )
        finally:
            log.close()

    def _wait_ready(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                return False
            if banner_ready(self.port, timeout=min(0.5, max(0.05, end - time.monotonic()))):
                return True
            # sshd not listening yet: wait for its log to change or a short tick, whichever first
            time.sleep(0.02)
        return False

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def ssh_params(self, *, name: str | None = None) -> SSHParams:
        return SSHParams(
            name=name or self.name,
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            key_files=(str(self.user_key),),
            known_hosts=(str(self.known_hosts),),
        )

    def ssh_argv(self) -> list[str]:
        """OpenSSH client options that reach this host with its key checked (for scp/ssh)."""
        return [
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(self.user_key),
        ]

    def stop(self) -> None:
        """SIGTERM the sshd (and its per-connection children) by PID, then SIGKILL; reaped."""
        self._finalizer()

    def __enter__(self) -> "LabHost":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LabHost({self.name!r}, port={self.port}, pid={self.pid})"
