"""The local machine as a Remote: the controller's own commands, and tests.

Same Result, same errors, same deadline rules as SSHRemote: the command runs as
`["sh", "-c", command]` in a process group of its own, and the whole group is killed when the
deadline passes. put/get are file copies.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import time
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

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

log = logging.getLogger("fleetbisect.remote")

KEEP_OUTPUT = 1 << 20
CHUNK = 1 << 20
KILL_WAIT = 2.0  # after SIGTERM, how long the group gets before SIGKILL


class OutputTail:
    """The last `cap` bytes of a stream, decoded as UTF-8 (errors replaced)."""

    def __init__(self, cap: int = KEEP_OUTPUT):
        self.cap, self.buf, self.dropped = cap, bytearray(), 0

    def add(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > 2 * self.cap:
            cut = len(self.buf) - self.cap
            del self.buf[:cut]
            self.dropped += cut

    def text(self) -> str:
        data = bytes(self.buf[-self.cap :])
        dropped = self.dropped + len(self.buf) - len(data)
        out = data.decode("utf-8", errors="replace")
        return f"[... {dropped} bytes dropped ...]\n{out}" if dropped else out


def heard_tails(output: Callable[[bytes], None]) -> tuple[OutputTail, OutputTail]:
    """stdout and stderr tails that also hand each piece to `output`."""

    class Heard(OutputTail):
        def add(self, data: bytes) -> None:
            super().add(data)
            output(data)

    return Heard(), Heard()


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class LocalRemote:
    """Runs commands on this machine; `cwd`/`env` apply to every command."""

    def __init__(self, name: str = "local", *, cwd: Path | None = None, env: dict[str, str] | None = None):
        self.name = name
        self.cwd = cwd
        self.env = env

    def run(self, command: str | Sequence[str], *, deadline: Deadline, check: bool = False,
            stdin: bytes | None = None) -> Result:
        cmd = command_string(command)
        started = time.monotonic()
        log.debug("%s: run: %s", self.name, cmd)
        out, err = OutputTail(), OutputTail()
        if deadline.expired:
            raise CommandTimedOut(self.name, cmd, deadline.seconds, Result(cmd, -1, "", "", 0.0))
        proc = subprocess.Popen(
            ["sh", "-c", cmd], cwd=self.cwd, env=self.env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        timed_out = False
        try:
            timed_out = not self._pump(proc, stdin, out, err, deadline)
        finally:
            if timed_out or proc.poll() is None:
                self._stop(proc)
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
        duration = time.monotonic() - started
        if timed_out:
            partial = Result(cmd, -1, out.text(), err.text(), duration)
            raise CommandTimedOut(self.name, cmd, deadline.seconds, partial)
        result = Result(cmd, proc.returncode, out.text(), err.text(), duration)
        if check and not result.ok:
            raise RemoteCommandFailed(self.name, result)
        return result

    @staticmethod
    def _pump(proc: subprocess.Popen, stdin: bytes | None, out: OutputTail, err: OutputTail,
              deadline: Deadline) -> bool:
        """Feed stdin, collect output; True when the process exited before the deadline."""
        sel = selectors.DefaultSelector()
        sinks = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        for fd in sinks:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        view = memoryview(stdin or b"")
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        try:
            while sel.get_map():
                left = deadline.remaining()
                if left <= 0:
                    return False
                for key, _ in sel.select(timeout=left):
                    fd = key.fd
                    if fd in sinks:
                        data = os.read(fd, 65536)
                        if data:
                            sinks[fd].add(data)
                        else:
                            sel.unregister(fd)
                        continue
                    try:
                        view = view[os.write(fd, view[:65536]) :]
                    except BrokenPipeError:
                        view = view[:0]
                    if not view:
                        sel.unregister(fd)
                        proc.stdin.close()
            try:
                proc.wait(timeout=max(0.001, deadline.remaining()))
            except subprocess.TimeoutExpired:
                return False
            return True
        finally:
            sel.close()

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_WAIT)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _killpg(proc.pid, signal.SIGKILL)  # stragglers left in the group

    # files -------------------------------------------------------------------------------

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
            with open(remote_path, "wb") as dst:
                while done < size:
                    if deadline.expired:
                        raise TransferTimedOut(self.name, remote_path, deadline.seconds, done)
                    data = source.read(min(CHUNK, size - done))
                    if not data:
                        raise ValueError(f"source ended after {done} of {size} bytes")
                    dst.write(data)
                    done += len(data)
                    if progress:
                        progress(done)
        except OSError as e:
            raise RemoteError(self.name, f"cannot write {remote_path}: {e.strerror or e}") from None
        return TransferStats(remote_path, done, time.monotonic() - started)

    def get(self, remote_path: str, local: Path, *, deadline: Deadline) -> TransferStats:
        started = time.monotonic()
        local = Path(local)
        part = local.with_name(local.name + ".part")
        done = 0
        try:
            with open(remote_path, "rb") as src, open(part, "wb") as dst:
                while data := src.read(CHUNK):
                    if deadline.expired:
                        raise TransferTimedOut(self.name, remote_path, deadline.seconds, done)
                    dst.write(data)
                    done += len(data)
            os.replace(part, local)
        except OSError as e:
            part.unlink(missing_ok=True)
            raise RemoteError(self.name, f"cannot read {remote_path}: {e.strerror or e}") from None
        except TransferTimedOut:
            part.unlink(missing_ok=True)
            raise
        return TransferStats(remote_path, done, time.monotonic() - started)

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalRemote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

