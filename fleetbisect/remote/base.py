"""One `run()` shape for every place a command can run (fabric/invoke's lesson).

Stage code talks to a `Remote`; the SSH implementation, the local one and the scripted fake
all return the same `Result` and raise the same errors, so stages are tested against the fake
and run for real against sshd without a line changed.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Protocol, Sequence

from ..deadline import Deadline
from ..errors import InfraError, UserError

# --- errors --------------------------------------------------------------------------------


class RemoteError(InfraError):
    """A connection or channel fault: infrastructure, never a verdict."""

    def __init__(self, host: str, message: str):
        self.host = host
        super().__init__(f"{host}: {message}")


class ConnectFailed(RemoteError):
    """Could not connect or authenticate within the deadline."""


class TunnelRefused(ConnectFailed):
    """The host refuses to forward a connection at all (`AllowTcpForwarding no`, a
    `permitopen` restriction): a setup mistake, not a guest that is still booting."""


class HostKeyError(UserError):
    """The host key is unknown or does not match: never accepted silently.

    A user error (exit 2): fixing known_hosts is the user's call, retrying cannot help.
    """

    def __init__(self, host: str, message: str):
        self.host = host
        super().__init__(f"{host}: {message}")


class CommandTimedOut(RemoteError):
    """A command did not finish before its deadline; the remote side was told to stop too."""

    def __init__(self, host: str, command: str, seconds: float, partial: "Result | None" = None):
        self.command = command
        self.seconds = seconds
        self.partial = partial
        super().__init__(host, f"command timed out after {seconds:.1f}s: {command}")


class TransferTimedOut(RemoteError):
    """A transfer made no complete progress before its deadline (e.g. the network hung)."""

    def __init__(self, host: str, path: str, seconds: float, bytes_done: int):
        self.path = path
        self.seconds = seconds
        self.bytes_done = bytes_done
        super().__init__(
            host, f"transfer to {path} timed out after {seconds:.1f}s ({bytes_done} bytes done)"
        )


# --- values --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


@dataclass(frozen=True)
class TransferStats:
    path: str
    bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class SSHParams:
    """Everything needed to open one SSH connection; built from the inventory.

    `alias` is resolved through ssh_config (HostName, Port, User, IdentityFile,
    UserKnownHostsFile, ProxyJump; see remote/endpoint.py): the file `ssh_config` when set,
    else ~/.ssh/config and /etc/ssh/ssh_config. Explicit fields win over it. Host keys are checked against `known_hosts` files, or against
    `host_keys` (public key lines, e.g. a guest key baked into the image); an unknown or
    different key raises HostKeyError.
    """

    name: str  # for messages and logs: the inventory name, "prime-radiant" or "prime-radiant/guest"
    host: str | None = None
    port: int | None = None
    user: str | None = None
    alias: str | None = None
    ssh_config: str | None = None  # an ssh_config file read instead of ~/.ssh/config
    key_files: tuple[str, ...] = ()
    known_hosts: tuple[str, ...] = ()
    host_keys: tuple[str, ...] = ()  # "ssh-ed25519 AAAA..." lines; checked instead of known_hosts
    connect_timeout: float = 10.0
    keepalive: float = 5.0
    ciphers: tuple[str, ...] = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr")


def host_key_line(text: str) -> str:
    """A configured host key as its public key line: the line itself, or a .pub file's text."""
    text = text.strip()
    if text and not text.startswith(("ssh-", "ecdsa-", "sk-")) and Path(text).is_file():
        text = Path(text).read_text().strip()
    return text


def command_string(command: str | Sequence[str]) -> str:
    """A list is data and gets quoted word by word; a string is a shell snippet from config."""
    if isinstance(command, str):
        return command
    return shlex.join(str(c) for c in command)


def bounded(command: str | Sequence[str], seconds: float, kill_after: float = 5.0) -> str:
    """Wrap a command so the remote side stops it too: closing a channel does not kill it."""
    secs = max(1, int(seconds + 0.999))
    return shlex.join(
        ["timeout", "-k", str(int(kill_after)), str(secs), "sh", "-c", command_string(command)]
    )


Progress = Callable[[int], None]


class Remote(Protocol):
    """A place to run commands and move files: a host, a guest, the local machine, a fake."""

    name: str

    def run(
        self,
        command: str | Sequence[str],
        *,
        deadline: Deadline,
        check: bool = False,
        stdin: bytes | None = None,
    ) -> Result:
        """Run `command` (wrapped remotely in `timeout -k`), bounded by `deadline`.

        Raises CommandTimedOut when the deadline passes, RemoteError for channel faults, and
        (with check=True) RemoteCommandFailed for a non-zero exit.
        """
        ...

    def put(
        self, local: Path, remote_path: str, *, deadline: Deadline, progress: Progress | None = None
    ) -> TransferStats:
        """Upload a file. Raises TransferTimedOut/RemoteError; a partial file may remain at
        remote_path: callers upload to a staging name and rename."""
        ...

    def put_stream(
        self,
        source: BinaryIO,
        size: int,
        remote_path: str,
        *,
        deadline: Deadline,
        progress: Progress | None = None,
    ) -> TransferStats:
        """Upload `size` bytes read from `source`."""
        ...

    def get(self, remote_path: str, local: Path, *, deadline: Deadline) -> TransferStats:
        ...

    def close(self) -> None:
        ...


class RemoteCommandFailed(InfraError):
    def __init__(self, host: str, result: Result):
        self.host = host
        self.result = result
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        super().__init__(
            f"{host}: `{result.command}` exited {result.exit_status}"
            + (": " + " | ".join(tail) if tail else "")
        )
