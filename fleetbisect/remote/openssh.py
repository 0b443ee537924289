"""Bulk uploads through the OpenSSH client, when it is installed.

paramiko is CPU-bound on large uploads: each 32 KiB SSH packet (the most sshd accepts per
channel packet) costs ~140 us of Python, so it tops out near OpenSSH scp's default speed on a
2-core machine. OpenSSH's scp with AES-GCM moves the same bytes 1.3-1.4x faster (bench/push.py),
so the push stage hands artifacts of `BULK` bytes or more to it.

The connection gets exactly what the paramiko path resolved and checks, written into an
ssh_config of its own (`-F`, so neither ~/.ssh/config nor /etc/ssh/ssh_config can add or change
anything, and the ssh that OpenSSH starts for each ProxyJump hop reads the same file): the same
address, port, user and keys for the host and every hop, the same hop chain (ProxyJump), and a
known_hosts file holding exactly the keys `endpoint.expected_keys` accepts for each of them,
plus the ones it revokes (so a @cert-authority line or a key paramiko skipped cannot make
OpenSSH trust more); strict host key checking, batch mode, and the caller's deadline (the
process is killed at it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..deadline import Deadline
from .base import RemoteError, SSHParams, TransferStats, TransferTimedOut
from .endpoint import Endpoint, known_hosts_lines

BULK = 16 << 20  # smaller files go through paramiko: a process start would cost more
CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr"


class Unusable(Exception):
    """OpenSSH could not connect or log in where paramiko could: use paramiko instead."""


def available() -> bool:
    return shutil.which("scp") is not None and os.environ.get("FLEETBISECT_NO_OPENSSH") != "1"


def upload(params: SSHParams, endpoint: Endpoint, local: Path, remote_path: str,
           deadline: Deadline) -> TransferStats:
    """scp `local` to `remote_path`; raises TransferTimedOut, RemoteError, or Unusable."""
    size = local.stat().st_size
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fleetbisect-scp-") as tmp:
        config = Path(tmp) / "ssh_config"
        config.write_text(ssh_config(params, endpoint, Path(tmp) / "known_hosts"))
        argv = ["scp", "-q", "-B", "-F", str(config), "-c", CIPHERS, str(local),
                f"{TARGET}:{remote_path}"]
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=deadline.remaining())
        except subprocess.TimeoutExpired:
            raise TransferTimedOut(params.name, remote_path, deadline.seconds, 0) from None
    if proc.returncode != 0:
        err = proc.stderr.strip()
        if "Permission denied" in err or "Connection" in err or "Host key" in err or "host key" in err:
            raise Unusable(err[-300:])
        raise RemoteError(params.name, f"upload to {remote_path} failed: {err[-300:]}")
    return TransferStats(remote_path, size, time.monotonic() - started)


TARGET = "fleetbisect-target"


def ssh_config(params: SSHParams, endpoint: Endpoint, known_hosts: Path) -> str:
    """An ssh_config for OpenSSH that reaches `endpoint` as the paramiko path does: the host is
    `TARGET`, hops are `fleetbisect-hop-N`; host keys are filed under those names in
    `known_hosts` (written here), so a hop and the host on the same address cannot mix up.
    Raises Unusable for a value ssh_config cannot carry."""
    hops = [(f"fleetbisect-hop-{i}", hop) for i, hop in enumerate(endpoint.jumps, 1)]
    lines: list[str] = []
    known: list[str] = []
    for alias, ep in [*hops, (TARGET, endpoint)]:
        known += known_hosts_lines(ep, alias)
        lines += [f"Host {alias}", f"  HostName {_value(ep.host)}", f"  Port {ep.port}",
                  f"  User {_value(ep.user, tokens=False)}", f"  HostKeyAlias {alias}"]
        lines += [f"  IdentityFile {_value(k)}" for k in ep.key_files]
        if not ep.use_agent:
            lines += ["  IdentitiesOnly yes", "  IdentityAgent none"]
        if alias == TARGET and hops:
            lines.append("  ProxyJump " + ",".join(a for a, _ in hops))
        lines += [
            f"  UserKnownHostsFile {_value(str(known_hosts))}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes", "  UpdateHostKeys no", "  CheckHostIP no",
            "  BatchMode yes", "  ProxyCommand none",
            f"  ConnectTimeout {max(1, int(params.connect_timeout))}",
            f"  ServerAliveInterval {max(1, int(params.keepalive))}", "  ServerAliveCountMax 3",
        ]
    known_hosts.write_text("".join(line + "\n" for line in known))
    return "\n".join(lines) + "\n"


def _value(text: str, tokens: bool = True) -> str:
    """A value as ssh_config reads it back: %-tokens escaped (for keywords OpenSSH expands),
    quoted when it holds spaces."""
    if any(c in text for c in '"\n\r\\'):
        raise Unusable(f"{text!r} cannot be written into an ssh_config")
    if tokens:
        text = text.replace("%", "%%")
    return f'"{text}"' if any(c.isspace() for c in text) else text
