"""The SSH transport: paramiko underneath, deadlines on every blocking step, host keys checked.

    with SSHRemote.connect(params, deadline=Deadline.after(15)) as host:
        host.run(["uname", "-r"], deadline=Deadline.after(10), check=True)
        host.put(Path("bzImage"), "/srv/fb/staging/k.part", deadline=Deadline.after(300))

How the deadlines hold (paramiko has traps, see DESIGN.md):
- connect: the TCP connect, banner, key exchange and each auth attempt get what is left.
- every channel operation runs with the channel timeout set to what is left, so waiting for
  output, window space or an SFTP reply ends at the deadline; remote commands are wrapped in
  `timeout -k` (base.bounded) so the remote side stops too.
- a watchdog per call cuts the whole connection if the call is still blocked past its deadline
  (GRACE seconds later for commands, at once for transfers): a write into a stalled TCP
  connection blocks inside paramiko, where no channel timeout reaches. A cut, or a transfer
  that timed out, marks the connection broken: the next call reconnects (connections this
  class opened itself) or raises RemoteError (ones over a handed-in `sock`, e.g. a tunnel).
- `transport.is_active()` stays true after a peer vanished without a RST, so it is never
  trusted as "alive"; keepalives plus deadlines are.

Where to connect and which host key to trust is decided in endpoint.py (ssh_config,
ProxyJump, known_hosts via known_hosts.py); connect.py opens the connection (through the jump
hosts, if any). `SSHRemote.generation` and `tunnel_lost` tell a guest session riding this
connection (`open_tunnel`) that the host link under it was cut or re-established.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import paramiko

from ..deadline import Deadline
from . import openssh
from .base import (
    CommandTimedOut,
    ConnectFailed,
    Progress,
    RemoteCommandFailed,
    RemoteError,
    Result,
    SSHParams,
    TransferStats,
    TransferTimedOut,
    TunnelRefused,
    bounded,
    command_string,
)
from .connect import close_all, left as _left, open_chain, send_chunks, short as _short
from .endpoint import Endpoint, resolve
from .local import OutputTail, heard_tails

log = logging.getLogger("fleetbisect.remote")

SFTP_REQUEST = 255 * 1024  # OpenSSH's sftp-server takes messages up to 256 KiB
WRITE_CHUNK = 1 << 20  # bytes handed to the SFTP file per write
READ_CHUNK = 1 << 20
GRACE = 1.0  # how long a command may stay blocked past its deadline before the connection is cut
# (transfers get no grace: a transfer past its deadline has failed, and its connection is cut)


# --- the remote ---------------------------------------------------------------------------


class SSHRemote:
    """A Remote over one SSH connection (see the module docstring for the deadline rules).

    `generation` counts the transports this remote has opened: 1 after `connect`, one more
    each time a call found the connection broken and reconnected. A tunnel from `open_tunnel`
    remembers the generation it was opened on, so `tunnel_lost(chan)` can tell a caller whose
    guest session failed that the host connection under it was cut (and perhaps silently
    re-established): a fault of the link, infra-error, never the kernel's.

    With ProxyJump the connection is a chain: a transport per hop (each with its host key
    checked), the next one riding a `direct-tcpip` channel of the previous; they are opened,
    reconnected and closed together.
    """

    def __init__(self, params: SSHParams, endpoint: Endpoint, transport: paramiko.Transport,
                 own_socket: bool, jumps: Sequence[paramiko.Transport] = ()):
        self.name = params.name
        self.params = params
        self.endpoint = endpoint
        self.generation = 1
        self._transport: paramiko.Transport | None = transport
        self._jumps: list[paramiko.Transport] = list(jumps)
        self._own_socket = own_socket
        self._broken: str | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._no_sftp = False
        self._openssh_unusable = False
        self._lock = threading.RLock()

    # connecting --------------------------------------------------------------------------

    @classmethod
    def connect(cls, params: SSHParams, *, deadline: Deadline, sock=None) -> "SSHRemote":
        """Connect and authenticate within `deadline` (through the ProxyJump hops, if any);
        `sock` (e.g. from open_tunnel) replaces the TCP connection. Raises ConnectFailed,
        HostKeyError, or UserError for an ssh_config fleetbisect cannot honour."""
        endpoint = resolve(params)
        transport, jumps = open_chain(params, endpoint, deadline, sock)
        return cls(params, endpoint, transport, own_socket=sock is None, jumps=jumps)

    def open_tunnel(self, host: str, port: int, deadline: Deadline) -> paramiko.Channel:
        """A `direct-tcpip` channel from this host to host:port: a socket-like stream, e.g. the
        `sock` for connecting to a guest that only this host can reach. The channel carries
        the generation it was opened on (see `tunnel_lost`)."""
        transport = self._live(deadline)
        generation = self.generation
        try:
            chan = transport.open_channel(
                "direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=_left(deadline)
            )
        except paramiko.ChannelException as e:
            if e.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED:
                raise TunnelRefused(self.name, f"refuses to forward connections to {host}:{port} "
                                    f"({_short(e)}): is AllowTcpForwarding off in its sshd_config?") from None
            raise ConnectFailed(self.name, f"cannot open a tunnel to {host}:{port}: {_short(e)}") from None
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise ConnectFailed(self.name, f"cannot open a tunnel to {host}:{port}: {_short(e)}") from None
        chan.fleetbisect_generation = generation
        return chan

    def tunnel_lost(self, chan: paramiko.Channel, deadline: Deadline | None = None) -> str | None:
        """Why the host connection under a tunnel of `open_tunnel` is gone, or None while it
        is the live one. Call it after a failure on that tunnel: a reason means the link
        failed (infra-error), not what ran through it. paramiko notices a dead connection
        late (`is_active()` stays true for a while, or for good when the peer vanished without
        a RST): with a `deadline`, a connection that looks alive is probed (a session opened
        and closed within the deadline), and one that fails the probe is cut."""
        generation = getattr(chan, "fleetbisect_generation", None)
        if generation is None:
            raise ValueError(f"{self.name}: not a tunnel opened by open_tunnel")
        with self._lock:
            if generation != self.generation:
                return (f"the connection to {self.name} under this tunnel was cut and "
                        f"re-established (connection {generation} -> {self.generation})")
            transport = self._transport
            if deadline is not None and self._broken is None and transport is not None:
                try:
                    transport.open_session(timeout=_left(deadline)).close()
                except (paramiko.SSHException, OSError, EOFError) as e:
                    self._cut(f"a probe failed: {_short(e)}")
            if self._broken is not None or transport is None or not transport.is_active():
                return (f"the connection to {self.name} under this tunnel was cut "
                        f"({self._broken or 'closed by the peer'})")
        return None

    def transport(self, deadline: Deadline) -> paramiko.Transport:
        """The live paramiko Transport (reconnecting if needed), for tools such as the bench's
        scp-package comparison. Stage code should not need it."""
        return self._live(deadline)

    def _live(self, deadline: Deadline) -> paramiko.Transport:
        with self._lock:
            if self._broken is None and self._transport is not None and self._transport.is_active():
                return self._transport
            reason = self._broken or "connection closed by the peer"
            if not self._own_socket:  # tunnelled (the sock is gone) or closed on purpose
                raise RemoteError(self.name, f"connection lost ({reason})")
            log.info("%s: reconnecting (%s)", self.name, reason)
            self._drop_transport()
            self._transport, self._jumps = open_chain(self.params, self.endpoint, deadline, None)
            self.generation += 1
            self._broken = None
            return self._transport

    def _drop_transport(self) -> None:
        self._sftp = None
        transport, self._transport = self._transport, None
        jumps, self._jumps = self._jumps, []
        close_all([transport, *reversed(jumps)])

    def _cut(self, reason: str) -> None:
        """Mark the connection broken and close it; never blocks (paramiko's close does not
        wait for a writer stuck in a stalled socket)."""
        log.debug("%s: cutting the connection: %s", self.name, reason)
        self._broken = reason
        close_all([self._transport, *reversed(self._jumps)])

    def abort(self, reason: str) -> None:
        """Cut the connection from another thread (a stall watcher); never blocks."""
        self._cut(reason)

    @contextlib.contextmanager
    def _watchdog(self, deadline: Deadline, what: str, grace: float = GRACE) -> Iterator[None]:
        """Cut the connection if the block is still running `grace` seconds past the deadline."""
        timer = threading.Timer(
            deadline.remaining() + grace, self._cut,
            args=(f"{what} was still blocked {grace:.1f}s after its deadline",),
        )
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    # commands ----------------------------------------------------------------------------

    def run(self, command: str | Sequence[str], *, deadline: Deadline, check: bool = False,
            stdin: bytes | None = None, output: Callable[[bytes], None] | None = None) -> Result:
        """`output(data)` hears each piece of stdout/stderr as it comes (a stall watcher)."""
        cmd = command_string(command)
        started = time.monotonic()
        log.debug("%s: run: %s", self.name, cmd)
        out, err = (OutputTail(), OutputTail()) if output is None else heard_tails(output)

        def partial() -> Result:
            return Result(cmd, -1, out.text(), err.text(), time.monotonic() - started)

        def timed_out() -> CommandTimedOut:
            return CommandTimedOut(self.name, cmd, deadline.seconds, partial())

        if deadline.expired:
            raise timed_out()
        transport = self._live(deadline)
        with self._watchdog(deadline, f"`{cmd}`"):
            try:
                chan = transport.open_session(timeout=_left(deadline))
            except (paramiko.SSHException, OSError, EOFError) as e:
                if deadline.expired:
                    raise timed_out() from None
                raise RemoteError(self.name, f"cannot open a session: {_short(e)}") from None
            try:
                chan.settimeout(_left(deadline))
                chan.exec_command(bounded(cmd, deadline.remaining()))
                status = _pump(chan, stdin, out, err, deadline)
            except (TimeoutError, paramiko.SSHException, OSError, EOFError) as e:
                if deadline.expired or self._broken:
                    raise timed_out() from None
                raise RemoteError(self.name, f"`{cmd}`: {_short(e)}") from None
            finally:
                chan.close()
            if status is None:
                if deadline.expired:
                    raise timed_out()
                raise RemoteError(self.name, f"connection lost while running `{cmd}`")
        result = Result(cmd, status, out.text(), err.text(), time.monotonic() - started)
        log.debug("%s: exit %d after %.2fs: %s", self.name, status, result.duration, cmd)
        if check and not result.ok:
            raise RemoteCommandFailed(self.name, result)
        return result

    # files -------------------------------------------------------------------------------

    def put(self, local: Path, remote_path: str, *, deadline: Deadline,
            progress: Progress | None = None) -> TransferStats:
        """Upload a file. Big ones go through OpenSSH's scp when it is installed and this
        connection is a plain TCP one (see openssh.py); paramiko does the rest."""
        local = Path(local)
        if (progress is None and self._own_socket and not self._openssh_unusable
                and local.stat().st_size >= openssh.BULK and openssh.available()):
            try:
                return openssh.upload(self.params, self.endpoint, local, remote_path, deadline)
            except openssh.Unusable as e:
                log.info("%s: OpenSSH upload not usable (%s); using paramiko", self.name, e)
                self._openssh_unusable = True
        with open(local, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            return self.put_stream(src, size, remote_path, deadline=deadline, progress=progress)

    def put_stream(self, source: BinaryIO, size: int, remote_path: str, *, deadline: Deadline,
                   progress: Progress | None = None) -> TransferStats:
        started = time.monotonic()
        log.debug("%s: put %d bytes -> %s", self.name, size, remote_path)
        done = 0

        def timed_out() -> TransferTimedOut:
            return TransferTimedOut(self.name, remote_path, deadline.seconds, done)

        if deadline.expired:
            raise timed_out()
        transport = self._live(deadline)
        with self._watchdog(deadline, f"upload to {remote_path}", grace=0.0):
            try:
                sftp = self._sftp_client(transport, deadline)
                if sftp is None:
                    return self._put_exec(source, size, remote_path, deadline, progress)
                _settimeout(sftp, deadline)
                f = sftp.open(remote_path, "wb", bufsize=0)
                f.MAX_REQUEST_SIZE = SFTP_REQUEST
                f.set_pipelined(True)
                while done < size:
                    data = source.read(min(WRITE_CHUNK, size - done))
                    if not data:
                        f.close()
                        raise ValueError(f"source ended after {done} of {size} bytes")
                    _settimeout(sftp, deadline)
                    f.write(data)
                    done += len(data)
                    if progress:
                        progress(done)
                # paramiko drops write errors that arrive after the last write: check them
                while f._reqs:
                    _settimeout(sftp, deadline)
                    sftp._read_response(f._reqs.popleft())
                _settimeout(sftp, deadline)
                f.close()
                _settimeout(sftp, deadline)
                written = sftp.stat(remote_path).st_size
                if written != size:
                    raise RemoteError(self.name, f"{remote_path}: {written} bytes written, expected {size}")
            except TimeoutError:
                self._abandon_transfer()
                raise timed_out() from None
            except (paramiko.SSHException, EOFError, OSError) as e:
                if deadline.expired or self._broken:
                    self._abandon_transfer()
                    raise timed_out() from None
                self._sftp = None
                raise RemoteError(self.name, f"upload to {remote_path} failed: {_short(e)}") from None
        return TransferStats(remote_path, done, time.monotonic() - started)

    def get(self, remote_path: str, local: Path, *, deadline: Deadline) -> TransferStats:
        started = time.monotonic()
        local = Path(local)
        part = local.with_name(local.name + ".part")
        done = 0
        if deadline.expired:
            raise TransferTimedOut(self.name, remote_path, deadline.seconds, 0)
        transport = self._live(deadline)
        with self._watchdog(deadline, f"download of {remote_path}", grace=0.0):
            try:
                sftp = self._sftp_client(transport, deadline)
                with open(part, "wb") as out:
                    if sftp is None:
                        done = self._get_exec(remote_path, out, deadline)
                    else:
                        _settimeout(sftp, deadline)
                        with sftp.open(remote_path, "rb") as f:
                            f.MAX_REQUEST_SIZE = SFTP_REQUEST
                            while True:
                                _settimeout(sftp, deadline)
                                data = f.read(READ_CHUNK)
                                if not data:
                                    break
                                out.write(data)
                                done += len(data)
                os.replace(part, local)
            except TimeoutError:
                part.unlink(missing_ok=True)
                self._abandon_transfer()
                raise TransferTimedOut(self.name, remote_path, deadline.seconds, done) from None
            except (paramiko.SSHException, EOFError, OSError) as e:
                part.unlink(missing_ok=True)
                if deadline.expired or self._broken:
                    self._abandon_transfer()
                    raise TransferTimedOut(self.name, remote_path, deadline.seconds, done) from None
                self._sftp = None
                raise RemoteError(self.name, f"download of {remote_path} failed: {_short(e)}") from None
        return TransferStats(remote_path, done, time.monotonic() - started)

    def rename(self, src: str, dst: str, *, deadline: Deadline) -> None:
        """`mv -f src dst` on the host, as one SFTP request when it has SFTP (posix-rename:
        atomic, replacing dst), with no command started there."""
        with self._watchdog(deadline, f"rename of {src}", grace=0.0):
            sftp = self._sftp_client(self._live(deadline), deadline)
            if sftp is not None:
                try:
                    _settimeout(sftp, deadline)
                    return sftp.posix_rename(src, dst)
                except (paramiko.SSHException, EOFError, OSError, TimeoutError) as e:
                    if "unsupported" not in str(e).lower():  # posix-rename is an extension
                        raise RemoteError(self.name, f"rename of {src} failed: {_short(e)}") from None
                    log.info("%s: no SFTP posix-rename (%s); using mv", self.name, _short(e))
        self.run(["mv", "-f", src, dst], deadline=deadline, check=True)

    def _sftp_client(self, transport: paramiko.Transport, deadline: Deadline) -> paramiko.SFTPClient | None:
        """The connection's SFTP client (opened once), or None when the host has no SFTP."""
        if self._sftp is not None and not self._sftp.sock.closed:
            return self._sftp
        if self._no_sftp:
            return None
        chan = transport.open_session(timeout=_left(deadline))
        chan.settimeout(_left(deadline))
        try:
            chan.invoke_subsystem("sftp")
            self._sftp = paramiko.SFTPClient(chan)
        except paramiko.SSHException as e:
            chan.close()
            if deadline.expired or not transport.is_active():
                raise
            log.info("%s: no SFTP subsystem (%s); using cat over exec", self.name, _short(e))
            self._no_sftp = True
            return None
        return self._sftp

    def _abandon_transfer(self) -> None:
        """After a timed-out transfer the SFTP stream is mid-message and the TCP connection may
        be stalled: drop both (a later call reconnects, or raises RemoteError)."""
        self._cut("a transfer timed out")

    def _put_exec(self, source: BinaryIO, size: int, remote_path: str, deadline: Deadline,
                  progress: Progress | None) -> TransferStats:
        """Upload through `cat > path` for hosts without an SFTP subsystem."""
        started = time.monotonic()
        script = bounded(["sh", "-c", 'cat > "$1"', "sh", remote_path], deadline.remaining())
        chan = self._live(deadline).open_session(timeout=_left(deadline))
        done = 0
        try:
            chan.settimeout(_left(deadline))
            chan.exec_command(script)
            for done in send_chunks(chan, source, size, deadline, WRITE_CHUNK):
                if progress:
                    progress(done)
            chan.shutdown_write()
            err = OutputTail()
            status = _pump(chan, None, OutputTail(), err, deadline)
        except TimeoutError:
            raise TransferTimedOut(self.name, remote_path, deadline.seconds, done) from None
        finally:
            chan.close()
        if status != 0:
            raise RemoteError(self.name, f"upload to {remote_path} failed: {err.text().strip()[-200:]}")
        return TransferStats(remote_path, done, time.monotonic() - started)

    def _get_exec(self, remote_path: str, out: BinaryIO, deadline: Deadline) -> int:
        chan = self._live(deadline).open_session(timeout=_left(deadline))
        done = 0
        try:
            chan.settimeout(_left(deadline))
            chan.exec_command(bounded(["cat", remote_path], deadline.remaining()))
            chan.shutdown_write()
            while True:
                chan.settimeout(_left(deadline))
                data = chan.recv(READ_CHUNK)
                if not data:
                    break
                out.write(data)
                done += len(data)
            err = OutputTail()
            status = _pump(chan, None, OutputTail(), err, deadline)
        finally:
            chan.close()
        if status != 0:
            raise RemoteError(self.name, f"cannot read {remote_path}: {err.text().strip()[-200:]}")
        return done

    # lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._broken = self._broken or "closed"
            self._own_socket = False  # closed on purpose: no reconnecting
            sftp, self._sftp = self._sftp, None
            if sftp is not None:
                with contextlib.suppress(Exception):
                    sftp.sock.settimeout(1.0)
                    sftp.close()
            self._drop_transport()

    def __enter__(self) -> "SSHRemote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        ep = self.endpoint
        return f"SSHRemote({self.name!r}, {ep.user}@{ep.host}:{ep.port})"


# --- helpers ------------------------------------------------------------------------------


def _settimeout(sftp: paramiko.SFTPClient, deadline: Deadline, floor: float = 0.001) -> None:
    if deadline.expired and floor <= 0.001:
        raise TimeoutError("deadline passed")
    sftp.sock.settimeout(_left(deadline, floor))


def _pump(chan: paramiko.Channel, stdin: bytes | None, out: OutputTail, err: OutputTail,
          deadline: Deadline) -> int | None:
    """Feed stdin and collect stdout/stderr until the command exits or the deadline passes.

    Returns the exit status (-1 when the server sent none), or None when the channel closed
    without the command finishing (deadline passed or connection lost)."""
    fd = chan.fileno()  # a pipe paramiko sets while output is buffered (or the channel closed)
    pos = 0
    if not stdin:
        chan.shutdown_write()
    while True:
        while chan.recv_ready():
            out.add(chan.recv(65536))
        while chan.recv_stderr_ready():
            err.add(chan.recv_stderr(65536))
        if stdin and pos < len(stdin) and chan.send_ready():
            pos += chan.send(stdin[pos : pos + 65536])
            if pos >= len(stdin):
                chan.shutdown_write()
            continue
        if chan.exit_status_ready() and (chan.eof_received or chan.closed):
            while chan.recv_ready():
                out.add(chan.recv(65536))
            while chan.recv_stderr_ready():
                err.add(chan.recv_stderr(65536))
            if chan.exit_status == -1 and not chan.get_transport().is_active():
                return None  # the connection died under the command
            return chan.exit_status  # -1: the server sent no status (e.g. killed by a signal)
        left = deadline.remaining()
        if left <= 0:
            return None
        if chan.eof_received:
            # no more output can come; only the exit status (the pipe would stay readable)
            chan.status_event.wait(min(left, 0.5))
        elif stdin and pos < len(stdin):
            select.select([fd], [], [], min(left, 0.02))  # waiting for send window
        else:
            select.select([fd], [], [], min(left, 0.5))
