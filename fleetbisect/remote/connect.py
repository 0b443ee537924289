"""Opening an SSH connection with paramiko: TCP (or a handed-in socket, or a channel of the
previous ProxyJump hop), handshake with the preferred ciphers, the host key checked
(endpoint.check_host_key), public-key authentication, all within one deadline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading

import paramiko

from ..deadline import Deadline
from .base import ConnectFailed, SSHParams
from .endpoint import Endpoint, check_host_key, expected_keys

log = logging.getLogger("fleetbisect.remote")

DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")


def left(deadline: Deadline, floor: float = 0.001) -> float:
    """Seconds left, never 0 (paramiko treats a 0 timeout as non-blocking)."""
    return max(floor, deadline.remaining())


def send_chunks(chan, source, size: int, deadline: Deadline, chunk: int = 1 << 20):
    """Write `size` bytes of `source` into the channel `chan` under `deadline`, yielding the
    bytes sent so far after each chunk (for progress). A source shorter than `size` is a
    ValueError, a channel that takes nothing more an EOFError, the deadline a TimeoutError."""
    done = 0
    while done < size:
        data = memoryview(source.read(min(chunk, size - done)))
        if not data:
            raise ValueError(f"source ended after {done} of {size} bytes")
        while data:
            chan.settimeout(left(deadline))
            n = chan.send(data)
            if n <= 0:
                raise EOFError("channel closed")
            data = data[n:]
            done += n
        yield done


def short(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _load_key(path: str) -> paramiko.PKey:
    return paramiko.PKey.from_path(os.path.expanduser(path))


def close_all(transports) -> None:
    for transport in transports:
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()


def open_chain(params: SSHParams, ep: Endpoint, deadline: Deadline,
                sock) -> tuple[paramiko.Transport, list[paramiko.Transport]]:
    """The transport to `ep` and those of its ProxyJump hops (first first), all within
    `deadline`; each hop's host key is checked before anything is sent through it. A handed-in
    `sock` replaces the whole path."""
    jumps: list[paramiko.Transport] = []
    try:
        if sock is None:
            for hop in ep.jumps:
                hop_sock = _jump_channel(params, jumps[-1], ep.jumps[len(jumps) - 1], hop,
                                         deadline) if jumps else None
                jumps.append(_open_transport(params, hop, deadline, hop_sock))
            if jumps:
                sock = _jump_channel(params, jumps[-1], ep.jumps[-1], ep, deadline)
        return _open_transport(params, ep, deadline, sock), jumps
    except BaseException:
        close_all(reversed(jumps))
        raise


def _jump_channel(params: SSHParams, via: paramiko.Transport, hop: Endpoint, to: Endpoint,
                  deadline: Deadline) -> paramiko.Channel:
    try:
        return via.open_channel("direct-tcpip", (to.host, to.port), ("127.0.0.1", 0),
                                timeout=left(deadline))
    except (paramiko.SSHException, OSError, EOFError) as e:
        what = "timed out" if deadline.expired else short(e)
        raise ConnectFailed(params.name, f"{hop.prefix()}cannot open a channel to "
                            f"{to.host}:{to.port}: {what}") from None


class _ChannelSocket:
    """A channel (of a tunnel or a jump host) as the socket of a transport. When the connection
    under it dies, paramiko closes it from the transport's thread, and a channel close that
    cannot be sent there raises EOFError, printed as a thread traceback: swallow it."""

    def __init__(self, chan: paramiko.Channel):
        self._chan = chan

    def __getattr__(self, name: str):
        return getattr(self._chan, name)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._chan.close()


def _open_transport(params: SSHParams, ep: Endpoint, deadline: Deadline, sock) -> paramiko.Transport:
    """TCP connect (unless `sock`), handshake with the preferred ciphers, host key check,
    public-key auth: all within `deadline`. Raises ConnectFailed / HostKeyError."""
    where = ep.where
    expected, fix = expected_keys(params.name, ep)
    if sock is None:
        try:
            sock = socket.create_connection(
                (ep.host, ep.port), timeout=min(params.connect_timeout, left(deadline))
            )
        except socket.gaierror as e:
            raise ConnectFailed(params.name, ep.prefix() + f"cannot resolve {ep.host}: {e.strerror}") from None
        except TimeoutError:
            raise ConnectFailed(params.name, ep.prefix() + f"no answer from {ep.host}:{ep.port} "
                                f"within {min(params.connect_timeout, deadline.seconds):.0f}s") from None
        except OSError as e:
            raise ConnectFailed(params.name, ep.prefix() + f"cannot connect to {ep.host}:{ep.port}: "
                                f"{e.strerror or short(e)}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    elif isinstance(sock, paramiko.Channel):
        sock = _ChannelSocket(sock)
    transport = None
    try:
        transport = paramiko.Transport(sock)
        transport.banner_timeout = left(deadline)
        transport.handshake_timeout = left(deadline)
        transport.auth_timeout = left(deadline)
        transport.channel_timeout = left(deadline)
        opts = transport.get_security_options()
        offered = tuple(opts.ciphers)
        first = [c for c in params.ciphers if c in offered]
        opts.ciphers = tuple(first + [c for c in offered if c not in first])
        known_types = [k.get_name() for _, k in expected.accepted]
        if known_types:  # negotiate a host key type we can check (as OpenSSH does)
            types = list(opts.key_types)
            preferred = [t for t in types if t in known_types or
                         (t.startswith("rsa-sha2") and "ssh-rsa" in known_types)]
            opts.key_types = tuple(preferred + [t for t in types if t not in preferred])
        # paramiko's start_client(timeout=...) returns silently when the timeout passes: wait
        # on our own event instead and look at the outcome
        done = threading.Event()
        transport.start_client(event=done)
        done.wait(left(deadline))
        if not done.is_set() or not transport.is_active():
            error = transport.get_exception()
            what = (f"failed: {short(error)}" if error and not deadline.expired
                    else f"timed out after {deadline.seconds:.0f}s")
            raise ConnectFailed(params.name, ep.prefix() + f"SSH handshake with {ep.host}:{ep.port} {what}")
        check_host_key(params.name, ep, transport.get_remote_server_key(), expected, fix)
        _authenticate(transport, params, ep, deadline)
        transport.set_keepalive(max(1, int(params.keepalive)))
        log.debug("%s: connected to %s (%s)", params.name, where, transport.local_cipher)
        return transport
    except BaseException:
        if transport is not None:
            transport.close()
        else:
            sock.close()
        raise


def _authenticate(transport: paramiko.Transport, params: SSHParams, ep: Endpoint,
                  deadline: Deadline) -> None:
    problems: list[str] = []
    keys: list[tuple[str, paramiko.PKey]] = []
    for path in ep.key_files:
        try:
            keys.append((path, _load_key(path)))
        except paramiko.PasswordRequiredException:
            problems.append(f"{path} is encrypted (load it into ssh-agent)")
        except (OSError, paramiko.SSHException, ValueError) as e:
            problems.append(f"cannot load {path}: {short(e)}")
    agent = None
    if ep.use_agent:
        with contextlib.suppress(Exception):
            agent = paramiko.Agent()
            keys.extend(("ssh-agent", k) for k in agent.get_keys())
        if not ep.key_files:
            for base in DEFAULT_KEYS:
                path = os.path.expanduser(f"~/.ssh/{base}")
                if os.path.exists(path):
                    with contextlib.suppress(Exception):
                        keys.append((path, _load_key(path)))
    try:
        for source, key in keys:
            if deadline.expired:
                break
            transport.auth_timeout = left(deadline)
            try:
                transport.auth_publickey(ep.user, key)
            except paramiko.AuthenticationException:
                problems.append(f"{source} ({key.get_name()}) refused")
                continue
            except (paramiko.SSHException, EOFError, OSError) as e:
                what = "timed out" if deadline.expired else short(e)
                raise ConnectFailed(params.name, ep.prefix() + f"authentication as {ep.user} {what}") from None
            if transport.is_authenticated():
                return
    finally:
        if agent is not None:
            agent.close()
    if deadline.expired:
        raise ConnectFailed(params.name, ep.prefix() + f"authentication as {ep.user} timed out")
    if not keys and not problems:
        problems.append("no keys (none configured, no agent, no default key files)")
    raise ConnectFailed(
        params.name, ep.prefix() + f"authentication as {ep.user}@{ep.host} failed: " + "; ".join(problems)
    )
