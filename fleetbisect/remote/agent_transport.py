"""Transports to the QEMU guest agent: send one JSON command, get one JSON reply, under a
deadline (see remote/agent.py for what runs on top).

- `StreamTransport`: qemu-ga's wire protocol over a byte stream, resynchronised with
  `guest-sync-delimited` and a random id; `relay_opener` makes the stream an exec channel on
  the host's SSH connection running socat (or Python) to QEMU's unix socket, `unix_opener` a
  local unix socket.
- `VirshTransport`: `virsh qemu-agent-command DOMAIN JSON` on the host (libvirt syncs).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from typing import Callable, Protocol

from ..deadline import Deadline
from .base import CommandTimedOut, RemoteError, bounded

log = logging.getLogger("fleetbisect.remote.agent")

SENTINEL = b"\xff"  # qemu-ga's parser reset (sent) and response delimiter (received); never in UTF-8
SYNC_RESEND = 0.25  # seconds between guest-sync-delimited requests while the agent is silent
RELAY_LIFETIME = 24 * 3600  # the relay on the host is bounded too; the transport reopens it


class AgentError(RemoteError):
    """The agent answered with an error (`{"error": {"class", "desc"}}`)."""

    def __init__(self, host: str, command: str, error: dict):
        self.command = command
        self.error = error
        super().__init__(host, f"guest agent: {command}: {error.get('desc') or error}")


class AgentTimeout(RemoteError):
    """The agent did not answer before the deadline."""


# --- transports ---------------------------------------------------------------------------


class AgentTransport(Protocol):
    """Send one JSON command, get one JSON reply (`{"return": ...}` or `{"error": ...}`),
    under a deadline. Raises AgentTimeout when no reply came in time, RemoteError for a dead
    channel."""

    name: str

    def exchange(self, request: dict, deadline: Deadline) -> dict:
        ...

    def close(self) -> None:
        ...


class Stream(Protocol):
    """What a paramiko Channel and a socket both are."""

    def settimeout(self, timeout: float | None) -> None: ...
    def sendall(self, data: bytes) -> None: ...
    def recv(self, n: int) -> bytes: ...
    def close(self) -> None: ...


class StreamTransport:
    """qemu-ga's protocol over a byte stream opened by `open_stream(deadline)`.

    The stream is opened lazily and kept; it is resynchronised (guest-sync-delimited with a
    fresh random id; replies before it are dropped) when opened and after any exchange that
    timed out, whose late reply would otherwise be taken for the next one's. A stream that
    ended between exchanges is reopened (the relay may have reached its lifetime); one that
    ends during an exchange is a RemoteError, never a resend."""

    def __init__(self, name: str, open_stream: Callable[[Deadline], Stream]):
        self.name = name
        self._open = open_stream
        self._stream: Stream | None = None
        self._buf = b""
        self._synced = False

    def exchange(self, request: dict, deadline: Deadline) -> dict:
        """Never sent twice: a guest-exec whose reply was lost may have run."""
        self._ensure_synced(deadline)
        try:
            self._send(json.dumps(request).encode() + b"\n", deadline)
            return self._reply(deadline)
        except EOFError as e:
            self._drop()
            raise RemoteError(self.name, f"guest agent channel closed: {e}") from None

    def sync(self, deadline: Deadline) -> None:
        """Open the stream if needed and bring it in step with the agent."""
        self._synced = False
        self._ensure_synced(deadline)

    def _ensure_synced(self, deadline: Deadline) -> None:
        if self._stream is not None and _ended(self._stream):
            self._drop()  # the relay ended between exchanges (e.g. its lifetime): reopen it
        if self._stream is not None and self._synced:
            return
        if self._stream is None:
            self._buf = b""
            try:
                self._stream = self._open(deadline)
            except RemoteError:
                raise
            except (OSError, EOFError) as e:
                raise RemoteError(self.name, f"cannot reach the guest agent: {e}") from None
        try:
            self._sync(deadline)
        except EOFError as e:
            self._drop()
            raise RemoteError(self.name, f"guest agent channel closed: {e}") from None
        except AgentTimeout:
            self._drop()  # what we queued must not reach an agent that wakes up later
            raise

    def _sync(self, deadline: Deadline) -> None:
        """Send guest-sync-delimited (again every SYNC_RESEND while nothing answers: an agent
        that starts late reads them all and answers each) until the newest id comes back."""
        sent: list[int] = []
        next_send = 0.0
        while True:
            now = time.monotonic()
            if now >= next_send:
                sent.append(secrets.randbelow(1 << 31))
                req = {"execute": "guest-sync-delimited", "arguments": {"id": sent[-1]}}
                self._send(SENTINEL + json.dumps(req).encode() + b"\n", deadline)
                next_send = now + SYNC_RESEND
            line = self._line(Deadline(min(deadline.at, next_send), deadline.seconds), quiet=True)
            if line is None:
                if deadline.expired:
                    raise AgentTimeout(self.name, f"guest agent did not answer within {deadline.seconds:.1f}s")
                continue
            reply = _parse(line)
            if isinstance(reply, dict) and reply.get("return") in sent:
                if reply["return"] == sent[-1]:
                    self._synced = True
                    return
                next_send = float("inf")  # it is awake: the newest reply is on its way

    def _send(self, data: bytes, deadline: Deadline) -> None:
        assert self._stream is not None
        try:
            self._stream.settimeout(max(deadline.remaining(), 0.001))
            self._stream.sendall(data)
        except (TimeoutError, OSError) as e:
            self._synced = False
            if deadline.expired:
                raise AgentTimeout(self.name, "guest agent: sending timed out") from None
            raise EOFError(str(e)) from None

    def _reply(self, deadline: Deadline) -> dict:
        while True:
            line = self._line(deadline)
            if line is None:
                self._synced = False  # its reply may still come: resync before the next one
                raise AgentTimeout(self.name, f"guest agent did not answer within {deadline.seconds:.1f}s")
            reply = _parse(line)
            if isinstance(reply, dict) and ("return" in reply or "error" in reply):
                return reply
            log.debug("%s: ignoring agent output %r", self.name, line[:200])

    def _line(self, deadline: Deadline, quiet: bool = False) -> bytes | None:
        """The next newline-terminated message (after the last sentinel in it), or None at
        the deadline. Raises EOFError when the stream ended."""
        assert self._stream is not None
        while b"\n" not in self._buf:
            left = deadline.remaining()
            if left <= 0:
                return None
            try:
                self._stream.settimeout(left)
                chunk = self._stream.recv(1 << 20)
            except TimeoutError:
                return None
            except OSError as e:
                raise EOFError(str(e)) from None
            if not chunk:
                raise EOFError(self._why_closed())
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.rpartition(SENTINEL)[2].strip()

    def _why_closed(self) -> str:
        """What the relay said on its way out (paramiko channels keep stderr apart)."""
        stream = self._stream
        text = ""
        if stream is not None and hasattr(stream, "recv_stderr"):
            try:
                while stream.recv_stderr_ready():
                    text += stream.recv_stderr(4096).decode(errors="replace")
            except OSError:
                pass
        return text.strip()[-300:] or "end of stream"

    def _drop(self) -> None:
        stream, self._stream = self._stream, None
        self._synced = False
        self._buf = b""
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        self._drop()


def _ended(stream) -> bool:
    """A paramiko channel knows when its far end finished; a socket finds out on recv."""
    return bool(getattr(stream, "closed", False) is True or getattr(stream, "eof_received", False))


def _parse(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None


class VirshTransport:
    """libvirt's way to the agent: `virsh qemu-agent-command` on the host, one process per
    exchange (libvirt owns the socket and syncs the stream itself). Not yet wired to a target:
    a libvirt target's login() builds `AgentRemote.connect(VirshTransport(host, domain), ...)`."""

    NOT_YET = ("not responding", "not connected", "not available", "not synced")

    def __init__(self, host, domain: str, *, uri: str = "qemu:///system", name: str | None = None):
        self.host = host
        self.domain = domain
        self.uri = uri
        self.name = name or f"{host.name}/{domain}"

    def exchange(self, request: dict, deadline: Deadline) -> dict:
        agent_timeout = max(1, int(deadline.remaining()))
        argv = ["virsh", "-c", self.uri, "qemu-agent-command", "--timeout", str(agent_timeout),
                self.domain, json.dumps(request)]
        try:
            res = self.host.run(argv, deadline=Deadline(deadline.at + 5, deadline.seconds + 5))
        except CommandTimedOut:
            raise AgentTimeout(self.name, f"guest agent did not answer within {deadline.seconds:.1f}s") from None
        if not res.ok:
            text = (res.stderr or res.stdout).strip()
            if any(s in text for s in self.NOT_YET):
                raise AgentTimeout(self.name, f"guest agent: {text[-300:]}")
            return {"error": {"class": "VirshError", "desc": text[-500:]}}
        reply = _parse(res.stdout.strip().encode())
        if not isinstance(reply, dict) or not ("return" in reply or "error" in reply):
            raise RemoteError(self.name, f"virsh qemu-agent-command answered {res.stdout.strip()[:200]!r}")
        return reply

    def close(self) -> None:
        pass


# The relay on the host between the SSH channel and the agent's unix socket: socat when the
# path is plain enough for socat's address syntax, else Python (both quoted as argv words).
_RELAY_PY = r"""
import os, select, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    sys.exit("relay: cannot connect to %s: %s" % (sys.argv[1], e))
fds = [0, s.fileno()]
while fds:
    for fd in select.select(fds, [], [])[0]:
        data = os.read(fd, 1 << 20) if fd == 0 else s.recv(1 << 20)
        if not data:
            if fd == 0:
                s.shutdown(socket.SHUT_WR); fds.remove(0)
            else:
                sys.exit(0)
        elif fd == 0:
            s.sendall(data)
        else:
            os.write(1, data)
"""
_RELAY_SH = (
    'if [ -n "$3" ] && command -v socat >/dev/null 2>&1; then exec socat - "UNIX-CONNECT:$1"; fi; '
    'if command -v python3 >/dev/null 2>&1; then exec python3 -c "$2" "$1"; fi; '
    'echo "relay: the host has neither socat nor python3 to reach the guest agent" >&2; exit 127'
)
_SOCAT_SAFE = re.compile(r"[A-Za-z0-9_./+-]+")


def relay_argv(socket_path: str) -> list[str]:
    """The host command that joins its stdin/stdout to the agent's unix socket."""
    socat_ok = "1" if _SOCAT_SAFE.fullmatch(socket_path) else ""
    return ["sh", "-c", _RELAY_SH, "sh", socket_path, _RELAY_PY, socat_ok]


def relay_opener(host, socket_path: str, lifetime: float = RELAY_LIFETIME) -> Callable[[Deadline], Stream]:
    """Open streams to the agent's unix socket on `host` (an SSHRemote): an exec channel on
    the host's connection running `relay_argv`, bounded by `timeout` like every command."""
    from .connect import left

    def open_stream(deadline: Deadline) -> Stream:
        import paramiko

        transport = host.transport(deadline)
        try:
            chan = transport.open_session(timeout=left(deadline))
            chan.settimeout(left(deadline))
            chan.exec_command(bounded(relay_argv(socket_path), lifetime))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise RemoteError(host.name, f"cannot start the guest agent relay: {e}") from None
        return chan

    return open_stream


def unix_opener(socket_path: str) -> Callable[[Deadline], Stream]:
    """Streams to an agent socket on this machine (tests, a controller that is the host)."""
    import socket

    def open_stream(deadline: Deadline) -> Stream:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(max(deadline.remaining(), 0.001))
        s.connect(socket_path)
        return s

    return open_stream


