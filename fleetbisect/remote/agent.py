"""A Remote over the QEMU guest agent (qemu-ga): commands and files without the guest's network.

    transport = StreamTransport("lab/guest", relay_opener(host, "/srv/fb/vm/qga.sock"))
    guest = AgentRemote.connect(transport, deadline=Deadline.after(5))   # sync + guest-ping
    guest.run(["uname", "-r"], deadline=Deadline.after(10))

Three layers, each replaceable:

- a *transport* (remote/agent_transport.py) sends one JSON command and returns one JSON reply
  under a deadline (`exchange`). `StreamTransport` speaks qemu-ga's wire protocol over a byte
  stream (the agent's unix socket on the host, reached through a relay started over the
  host's SSH connection: `relay_opener`); it resynchronises the stream itself with
  `guest-sync-delimited` and a random id on connect and after any timeout. `VirshTransport`
  runs `virsh qemu-agent-command DOMAIN JSON` on the host instead (libvirt syncs for us).
- `Agent` turns replies into values or errors: guest-ping, guest-exec (captured output),
  guest-exec-status polled under the deadline (never an unbounded wait), guest-file-*.
- `AgentRemote` is the `Remote` protocol (run, put, put_stream, get, close) on top.

Every wait is bounded by a Deadline; an agent that does not answer is a RemoteError
(CommandTimedOut/TransferTimedOut for a command or transfer past its deadline): infrastructure
or the guest's death, judged by the caller, never silently a verdict.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from pathlib import Path
from typing import BinaryIO, Sequence

from ..deadline import Deadline
from .base import (
    CommandTimedOut,
    Progress,
    RemoteCommandFailed,
    RemoteError,
    Result,
    TransferStats,
    TransferTimedOut,
    bounded,
    command_string,
)
from .agent_transport import (  # noqa: F401 - the transports are part of this module's API
    AgentError,
    AgentTimeout,
    AgentTransport,
    StreamTransport,
    VirshTransport,
    relay_argv,
    relay_opener,
    unix_opener,
)

log = logging.getLogger("fleetbisect.remote.agent")

POLL_FIRST = 0.002  # guest-exec-status: first poll after this, then x1.5 each time...
POLL_MAX = 0.1  # ...up to this
FILE_CHUNK = 1 << 20  # bytes per guest-file-write / guest-file-read (qemu-ga reads up to 48 MB)


# --- the protocol -------------------------------------------------------------------------


class Agent:
    """qemu-ga's commands as Python calls, over any transport."""

    def __init__(self, transport: AgentTransport):
        self.transport = transport
        self.name = transport.name

    def call(self, execute: str, deadline: Deadline, **arguments):
        req: dict = {"execute": execute}
        if arguments:
            req["arguments"] = arguments
        reply = self.transport.exchange(req, deadline)
        if "error" in reply:
            raise AgentError(self.name, execute, reply["error"] or {})
        return reply.get("return")

    def ping(self, deadline: Deadline) -> None:
        self.call("guest-ping", deadline)

    def exec(self, path: str, args: Sequence[str], deadline: Deadline, stdin: bytes | None = None) -> int:
        arguments: dict = {"path": path, "arg": list(args), "capture-output": True}
        if stdin:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        return int(self.call("guest-exec", deadline, **arguments)["pid"])

    def wait(self, pid: int, deadline: Deadline) -> dict | None:
        """guest-exec-status polled until the process exited; None at the deadline."""
        pause = POLL_FIRST
        while True:
            status = self.call("guest-exec-status", deadline, pid=pid)
            if status.get("exited"):
                return status
            if deadline.remaining() <= pause:
                return None
            time.sleep(pause)
            pause = min(pause * 1.5, POLL_MAX)

    def open(self, path: str, mode: str, deadline: Deadline) -> int:
        return int(self.call("guest-file-open", deadline, path=path, mode=mode))

    def write(self, handle: int, data: bytes, deadline: Deadline) -> int:
        ret = self.call("guest-file-write", deadline, handle=handle, **{"buf-b64": base64.b64encode(data).decode()})
        return int(ret["count"])

    def read(self, handle: int, count: int, deadline: Deadline) -> tuple[bytes, bool]:
        ret = self.call("guest-file-read", deadline, handle=handle, count=count)
        return base64.b64decode(ret.get("buf-b64", "")), bool(ret.get("eof"))

    def close_file(self, handle: int, deadline: Deadline) -> None:
        self.call("guest-file-close", deadline, handle=handle)


def _decoded(status: dict, key: str) -> str:
    return base64.b64decode(status.get(key, "")).decode("utf-8", errors="replace")


# --- the Remote -----------------------------------------------------------------------------


class AgentRemote:
    """A Remote in the guest through its agent. Commands run as `SHELL -c CMD` wrapped in
    `timeout -k` (base.bounded), so a command past its deadline is stopped in the guest too.
    qemu-ga returns a command's output only once it exited (and keeps at most 16 MB of it),
    so a timed-out command has no partial output. Files move with guest-file-* in FILE_CHUNK
    pieces (base64 in JSON: much slower than SSH, fine for reproducers' inputs)."""

    def __init__(self, transport: AgentTransport, *, shell: str = "/bin/sh"):
        self.name = transport.name
        self.agent = Agent(transport)
        self.shell = shell

    @classmethod
    def connect(cls, transport: AgentTransport, *, deadline: Deadline, shell: str = "/bin/sh") -> "AgentRemote":
        """Reach the agent (sync, then guest-ping) within `deadline`; RemoteError otherwise."""
        remote = cls(transport, shell=shell)
        try:
            sync = getattr(transport, "sync", None)
            if sync is not None:
                sync(deadline)
            remote.agent.ping(deadline)
        except RemoteError:
            transport.close()
            raise
        return remote

    def run(self, command: str | Sequence[str], *, deadline: Deadline, check: bool = False,
            stdin: bytes | None = None) -> Result:
        cmd = command_string(command)
        started = time.monotonic()
        if deadline.expired:
            raise CommandTimedOut(self.name, cmd, deadline.seconds)
        try:
            pid = self.agent.exec(self.shell, ["-c", bounded(cmd, deadline.remaining())], deadline, stdin)
            status = self.agent.wait(pid, deadline)
        except AgentTimeout:
            raise CommandTimedOut(self.name, cmd, deadline.seconds) from None
        if status is None:
            raise CommandTimedOut(self.name, cmd, deadline.seconds)
        if "exitcode" in status:
            code = int(status["exitcode"])
        else:  # killed by a signal: as a shell reports it
            code = 128 + int(status.get("signal", 0))
        result = Result(cmd, code, _decoded(status, "out-data"), _decoded(status, "err-data"),
                        time.monotonic() - started)
        if status.get("out-truncated") or status.get("err-truncated"):
            log.warning("%s: the agent truncated the output of `%s`", self.name, cmd)
        if check and not result.ok:
            raise RemoteCommandFailed(self.name, result)
        return result

    def put(self, local: Path, remote_path: str, *, deadline: Deadline,
            progress: Progress | None = None) -> TransferStats:
        with open(local, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            return self.put_stream(src, size, remote_path, deadline=deadline, progress=progress)

    def put_stream(self, source: BinaryIO, size: int, remote_path: str, *, deadline: Deadline,
                   progress: Progress | None = None) -> TransferStats:
        started = time.monotonic()
        done = 0
        try:
            handle = self.agent.open(remote_path, "w", deadline)
            try:
                while done < size:
                    data = source.read(min(FILE_CHUNK, size - done))
                    if not data:
                        raise ValueError(f"source ended after {done} of {size} bytes")
                    view = memoryview(data)
                    while view:
                        n = self.agent.write(handle, bytes(view), deadline)
                        if n <= 0:
                            raise RemoteError(self.name, f"upload to {remote_path}: the agent wrote nothing")
                        view = view[n:]
                        done += n
                    if progress:
                        progress(done)
            finally:
                self._close_quietly(handle, deadline)
        except AgentTimeout:
            raise TransferTimedOut(self.name, remote_path, deadline.seconds, done) from None
        return TransferStats(remote_path, done, time.monotonic() - started)

    def get(self, remote_path: str, local: Path, *, deadline: Deadline) -> TransferStats:
        started = time.monotonic()
        local = Path(local)
        part = local.with_name(local.name + ".part")
        done = 0
        try:
            handle = self.agent.open(remote_path, "r", deadline)
            try:
                with open(part, "wb") as out:
                    while True:
                        data, eof = self.agent.read(handle, FILE_CHUNK, deadline)
                        out.write(data)
                        done += len(data)
                        if eof or not data:
                            break
            finally:
                self._close_quietly(handle, deadline)
            os.replace(part, local)
        except AgentTimeout:
            part.unlink(missing_ok=True)
            raise TransferTimedOut(self.name, remote_path, deadline.seconds, done) from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return TransferStats(remote_path, done, time.monotonic() - started)

    def _close_quietly(self, handle: int, deadline: Deadline) -> None:
        try:
            self.agent.close_file(handle, Deadline(max(deadline.at, time.monotonic() + 2), 2))
        except RemoteError as e:
            log.debug("%s: could not close agent file handle %d: %s", self.name, handle, e)

    def close(self) -> None:
        self.agent.transport.close()

    def __enter__(self) -> "AgentRemote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AgentRemote({self.name!r})"


__all__ = ["Agent", "AgentError", "AgentRemote", "AgentTimeout", "AgentTransport", "StreamTransport",
           "VirshTransport", "relay_argv", "relay_opener", "unix_opener"]
