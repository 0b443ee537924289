"""The scp protocol (the "legacy" one `scp -O` speaks) over an SSH connection of our own.

Upload only, one file: `scp -t DEST` runs in the guest, we send `C0644 SIZE NAME`, the bytes
and a final NUL, and every step waits for the sink's one-byte answer (0 fine, 1 warning, 2
fatal, followed by its message). The bytes go straight into the channel in large writes (the
sink writes them to disk as they come), with `progress(done)` after each, so a stall watcher
sees them move. Every wait has the caller's deadline; the remote command is also bounded with
`timeout -k`.
"""

from __future__ import annotations

import posixpath
import time
from typing import BinaryIO

import paramiko

from ..deadline import Deadline
from .base import Progress, RemoteError, TransferStats, TransferTimedOut, bounded
from .connect import left as _left, send_chunks, short as _short

CHUNK = 1 << 20  # bytes read from the source per channel write


def _answer(chan: paramiko.Channel, deadline: Deadline) -> None:
    """The sink's answer to what we just sent: RemoteError for a warning or an error."""
    chan.settimeout(_left(deadline))
    code = chan.recv(1)
    if not code:
        raise EOFError("the scp sink closed the channel")
    if code == b"\0":
        return
    message = b""
    while not message.endswith(b"\n") and len(message) < 4096:
        chan.settimeout(_left(deadline))
        more = chan.recv(1)
        if not more:
            break
        message += more
    raise _SinkSaid(message.decode(errors="replace").strip() or f"scp sink answered {code!r}")


class _SinkSaid(Exception):
    pass


def put(transport: paramiko.Transport, name: str, source: BinaryIO, size: int, remote_path: str, *,
        deadline: Deadline, progress: Progress | None = None) -> TransferStats:
    """Copy `size` bytes of `source` to `remote_path` with `scp -t`. Raises TransferTimedOut at
    the deadline, RemoteError for anything else (the sink's own message when it gave one)."""
    started = time.monotonic()
    done = 0
    chan = None
    try:
        chan = transport.open_session(timeout=_left(deadline))
        chan.settimeout(_left(deadline))
        chan.exec_command(bounded(["scp", "-t", remote_path], deadline.remaining()))
        _answer(chan, deadline)
        base = posixpath.basename(remote_path).replace("\n", "_") or "file"
        chan.sendall(f"C0644 {size} {base}\n".encode())
        _answer(chan, deadline)
        for done in send_chunks(chan, source, size, deadline, CHUNK):
            if progress:
                progress(done)
        chan.sendall(b"\0")
        _answer(chan, deadline)
        chan.shutdown_write()
    except TimeoutError:
        raise TransferTimedOut(name, remote_path, deadline.seconds, done) from None
    except ValueError as e:  # the source was shorter than it said
        raise RemoteError(name, str(e)) from None
    except _SinkSaid as e:
        raise RemoteError(name, f"upload to {remote_path} failed: {e}") from None
    except (paramiko.SSHException, EOFError, OSError) as e:
        if deadline.expired:
            raise TransferTimedOut(name, remote_path, deadline.seconds, done) from None
        raise RemoteError(name, f"upload to {remote_path} failed after {done} bytes: {_short(e)}") from None
    finally:
        if chan is not None:
            chan.close()
    return TransferStats(remote_path, done, time.monotonic() - started)
