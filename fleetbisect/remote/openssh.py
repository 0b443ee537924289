"""Bulk uploads through the OpenSSH client, when it is installed.

paramiko is CPU-bound on large uploads: each 32 KiB SSH packet (the most sshd accepts per
channel packet) costs ~140 us of Python, so it tops out near OpenSSH scp's default speed on a
2-core machine. OpenSSH's scp with AES-GCM moves the same bytes 1.3-1.4x faster (bench/push.py),
so the push stage hands artifacts of `BULK` bytes or more to it. The connection gets exactly
the checks the paramiko path applies: the same resolved address, user and keys, the same
known_hosts files (or the configured host key, in a known_hosts file of its own), strict host
key checking, batch mode, and the caller's deadline (the process is killed at it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..deadline import Deadline
from .base import RemoteError, SSHParams, TransferStats, TransferTimedOut, host_key_line

BULK = 16 << 20  # smaller files go through paramiko: a process start would cost more
CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr"


class Unusable(Exception):
    """OpenSSH could not connect or log in where paramiko could: use paramiko instead."""


def available() -> bool:
    return shutil.which("scp") is not None and os.environ.get("FLEETBISECT_NO_OPENSSH") != "1"


def upload(params: SSHParams, endpoint, local: Path, remote_path: str, deadline: Deadline) -> TransferStats:
    """scp `local` to `remote_path`; raises TransferTimedOut, RemoteError, or Unusable."""
    size = local.stat().st_size
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fleetbisect-scp-") as tmp:
        known = list(endpoint.known_hosts)
        if params.host_keys:  # a guest's key from its image: a known_hosts of its own
            path = Path(tmp) / "known_hosts"
            path.write_text("".join(f"{endpoint.known_hosts_name} {' '.join(host_key_line(k).split()[:2])}\n" for k in params.host_keys))
            known = [str(path)]
        argv = [
            "scp", "-q", "-B", "-P", str(endpoint.port), "-c", CIPHERS,
            "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=" + " ".join(known),
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no",
            "-o", f"ConnectTimeout={max(1, int(params.connect_timeout))}",
            "-o", f"ServerAliveInterval={max(1, int(params.keepalive))}", "-o", "ServerAliveCountMax=3",
        ]
        for key in endpoint.key_files:
            argv += ["-i", key]
        if endpoint.key_files:
            argv += ["-o", "IdentitiesOnly=yes"]
        argv += [str(local), f"{endpoint.user}@{_bracket(endpoint.host)}:{remote_path}"]
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


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
