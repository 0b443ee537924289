"""A scripted Remote for unit tests of stage logic.

    host = FakeRemote("host")
    host.on("uname -r", stdout="6.1.0\\n")                       # exact command
    host.on(re.compile(r"^mv "), exit_status=1, stderr="no")     # regex (search)
    host.on("boot", raises=RemoteError("host", "gone"))          # an exception
    host.on("count", lambda call: Result(call.command, 0, str(len(host.calls)), "", 0.0))
    host.on("flaky", [Result(...fail...), Result(...ok...)])     # one per call, last repeats
    host.files["/srv/x"] = b"data"                               # the fake filesystem

The most recently registered matching handler wins, so a test can override a fixture's
defaults. An unmatched command returns exit 0 with no output, unless `strict=True` (then it
raises LookupError). Every call is recorded in `calls`; put/get go through `files`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence, Union

from ..deadline import Deadline
from .base import (
    CommandTimedOut,
    Progress,
    RemoteCommandFailed,
    RemoteError,
    Result,
    TransferStats,
    TransferTimedOut,
    command_string,
)


@dataclass(frozen=True)
class Call:
    kind: str  # "run", "put", "get"
    command: str  # the command, or the remote path for put/get
    stdin: bytes | None = None


Response = Union[Result, BaseException, Callable[[Call], Result], list]


class FakeRemote:
    def __init__(self, name: str = "fake", *, strict: bool = False):
        self.name = name
        self.strict = strict
        self.calls: list[Call] = []
        self.files: dict[str, bytes] = {}
        self.closed = False
        self._handlers: list[tuple[str | re.Pattern, list]] = []

    # scripting ---------------------------------------------------------------------------

    def on(self, pattern: str | re.Pattern, response: Response | None = None, *,
           exit_status: int = 0, stdout: str = "", stderr: str = "",
           raises: BaseException | None = None) -> "FakeRemote":
        """Answer commands equal to `pattern` (str) or matching it (compiled regex)."""
        if raises is not None:
            response = raises
        if response is None:
            response = Result("", exit_status, stdout, stderr, 0.0)
        queue = list(response) if isinstance(response, list) else [response]
        self._handlers.insert(0, (pattern, queue))
        return self

    def commands(self) -> list[str]:
        """The commands run so far, in order."""
        return [c.command for c in self.calls if c.kind == "run"]

    # Remote ------------------------------------------------------------------------------

    def run(self, command: str | Sequence[str], *, deadline: Deadline, check: bool = False,
            stdin: bytes | None = None) -> Result:
        cmd = command_string(command)
        call = Call("run", cmd, stdin)
        self.calls.append(call)
        if self.closed:
            raise RemoteError(self.name, "connection closed")
        if deadline.expired:
            raise CommandTimedOut(self.name, cmd, deadline.seconds, Result(cmd, -1, "", "", 0.0))
        response = self._respond(call)
        if isinstance(response, BaseException):
            raise response
        result = response(call) if callable(response) else response
        result = Result(cmd, result.exit_status, result.stdout, result.stderr, result.duration)
        if check and not result.ok:
            raise RemoteCommandFailed(self.name, result)
        return result

    def _respond(self, call: Call):
        for pattern, queue in self._handlers:
            hit = (pattern.search(call.command) if isinstance(pattern, re.Pattern)
                   else pattern == call.command)
            if hit:
                return queue.pop(0) if len(queue) > 1 else queue[0]
        if self.strict:
            raise LookupError(f"{self.name}: no handler for {call.command!r}")
        return Result(call.command, 0, "", "", 0.0)

    def put(self, local: Path, remote_path: str, *, deadline: Deadline,
            progress: Progress | None = None) -> TransferStats:
        data = Path(local).read_bytes()
        return self._store(data, remote_path, deadline, progress)

    def put_stream(self, source: BinaryIO, size: int, remote_path: str, *, deadline: Deadline,
                   progress: Progress | None = None) -> TransferStats:
        data = source.read(size)
        if len(data) != size:
            raise ValueError(f"source ended after {len(data)} of {size} bytes")
        return self._store(data, remote_path, deadline, progress)

    def _store(self, data: bytes, remote_path: str, deadline: Deadline,
               progress: Progress | None) -> TransferStats:
        self.calls.append(Call("put", remote_path))
        if self.closed:
            raise RemoteError(self.name, "connection closed")
        if deadline.expired:
            raise TransferTimedOut(self.name, remote_path, deadline.seconds, 0)
        self.files[remote_path] = data
        if progress:
            progress(len(data))
        return TransferStats(remote_path, len(data), 0.0)

    def get(self, remote_path: str, local: Path, *, deadline: Deadline) -> TransferStats:
        self.calls.append(Call("get", remote_path))
        if self.closed:
            raise RemoteError(self.name, "connection closed")
        if remote_path not in self.files:
            raise RemoteError(self.name, f"cannot read {remote_path}: No such file")
        Path(local).write_bytes(self.files[remote_path])
        return TransferStats(remote_path, len(self.files[remote_path]), 0.0)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> "FakeRemote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
