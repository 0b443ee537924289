"""How scp-stress moves a file into the guest: one function per `method`, all watched alike.

- `openssh-scp`: OpenSSH's own `scp -O`, as the user's script ran it, from a file of random
  bytes made once on this machine. It gets the ssh_config the push stage's OpenSSH path writes
  (remote/openssh.py): the guest's pinned host key in a known_hosts file of its own, strict
  checking, batch mode; through the host as a ProxyJump when the guest is reached `via: host`.
  Its progress is what the scp process has read of the file (`rchar` in /proc/PID/io: scp
  reads only as fast as ssh takes the bytes); a stall or the deadline kills its process group.
- `scp`: the scp protocol over fleetbisect's own connection to the guest
  (remote/scp_protocol.py); a stall cuts that connection.
- `sftp`: the guest's sftp-server (SSHRemote.put_stream); a stall cuts the connection.

Each takes a `Watch` (watch.py): it reports progress to it, and the watch's `on_stall` is set
to whatever stops this method's transfer. A guest that is no SSHRemote (a fake, the agent) is
written through its own `put_stream`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ..deadline import Deadline
from ..remote import openssh, scp_protocol
from ..remote.base import Remote, RemoteError, TransferStats, TransferTimedOut
from ..remote.ssh import SSHRemote
from .watch import TICK, Watch

BLOCK = 1 << 20
log = logging.getLogger("fleetbisect.reproducers")
# What a write into the guest says when the guest's environment, not its kernel, refused it
# (not OpenSSH's "Permission denied (publickey)": that is the login).
ENVIRONMENT = re.compile(
    r"No space left on device|Disk quota exceeded|Permission denied(?! \()|Read-only file system|"
    r"Operation not permitted|No such file or directory|Is a directory|bytes written, expected",
    re.IGNORECASE,
)


class PatternSource:
    """`size` bytes of incompressible data without holding them in memory."""

    def __init__(self, size: int, block: bytes | None = None):
        self.left = size
        self.block = block or os.urandom(BLOCK)
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        out = bytearray()
        while len(out) < n:
            take = min(n - len(out), len(self.block) - self.pos)
            out += self.block[self.pos : self.pos + take]
            self.pos = (self.pos + take) % len(self.block)
        self.left -= n
        return bytes(out)


def stress_file(size: int, directory: Path | None = None) -> Path:
    """A file of `size` random bytes, made once and kept (OpenSSH scp reads a real file)."""
    base = directory or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fleetbisect"
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"stress-{size}.bin"
    if path.exists() and path.stat().st_size == size:
        return path
    fd, tmp = tempfile.mkstemp(dir=base, prefix=".stress-")
    try:
        with os.fdopen(fd, "wb") as f:
            src = PatternSource(size)
            while src.left:
                f.write(src.read(BLOCK))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def put(method: str, guest: Remote, size: int, dest: str, deadline: Deadline, watch: Watch,
        block: bytes, via_host: Remote | None = None) -> TransferStats:
    """Copy `size` bytes to `dest` in the guest by `method`, reporting to `watch` (whose
    on_stall this sets). Raises TransferTimedOut / RemoteError (also after a stall: the caller
    asks the watch)."""
    if not isinstance(guest, SSHRemote):  # a fake, the guest agent: its own abort, if it has one
        watch.on_stall = getattr(guest, "abort", watch.on_stall)
        return guest.put_stream(PatternSource(size, block), size, dest, deadline=deadline,
                                progress=watch.progress)
    if method == "openssh-scp" and openssh.available():
        try:
            return openssh_scp(guest, size, dest, deadline, watch, via_host)
        except openssh.Unusable as e:
            # OpenSSH failed before a byte moved where paramiko logged in: the scp protocol over
            # that login tells whether the guest takes the file (never a verdict from OpenSSH's
            # own trouble)
            log.warning("%s: OpenSSH scp failed before any byte moved (%s); using the scp protocol",
                        guest.name, e)
    watch.on_stall = guest.abort
    if method in ("scp", "openssh-scp"):
        return scp_protocol.put(guest.transport(deadline), guest.name, PatternSource(size, block), size,
                                dest, deadline=deadline, progress=watch.progress)
    return guest.put_stream(PatternSource(size, block), size, dest, deadline=deadline, progress=watch.progress)


def _rchar(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def openssh_scp(guest, size: int, dest: str, deadline: Deadline, watch: Watch,
                via_host: Remote | None = None) -> TransferStats:
    """`scp -O` of a stress file to `dest` with the guest's pinned key (through the host as a
    ProxyJump when `via_host`); see the module docstring."""
    local = stress_file(size)
    endpoint = guest.endpoint
    if via_host is not None:
        hop = dataclasses.replace(via_host.endpoint, role=f"host {via_host.name}", jumps=())
        endpoint = dataclasses.replace(endpoint, jumps=(*via_host.endpoint.jumps, hop))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fleetbisect-stress-") as tmp:
        config = Path(tmp) / "ssh_config"
        try:
            config.write_text(openssh.ssh_config(guest.params, endpoint, Path(tmp) / "known_hosts"))
        except openssh.Unusable as e:
            raise RemoteError(guest.name, f"OpenSSH cannot reach the guest as configured: {e}") from None
        argv = ["scp", "-O", "-q", "-B", "-F", str(config), "-c", openssh.CIPHERS, str(local),
                f"{openssh.TARGET}:{dest}"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)

        def stop(reason: str) -> None:  # scp and the ssh it started: the group we created
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        watch.on_stall = stop
        try:
            while True:
                try:
                    proc.wait(TICK)
                    break
                except subprocess.TimeoutExpired:
                    watch.progress(min(size, _rchar(proc.pid)))
            err = proc.stderr.read().decode(errors="replace").strip()
        finally:
            if proc.poll() is None:
                stop("left")
                proc.wait()
            proc.stderr.close()
    if proc.returncode == 0:
        watch.progress(size)
        return TransferStats(dest, size, time.monotonic() - started)
    if watch.stalled or watch.timed_out or deadline.expired:
        raise TransferTimedOut(guest.name, dest, deadline.seconds, watch.done)
    if watch.done == 0 and not ENVIRONMENT.search(err):
        raise openssh.Unusable(err[-300:] or f"exit {proc.returncode}")
    raise RemoteError(guest.name, f"scp to {dest} failed: {err[-300:] or f'exit {proc.returncode}'}")
