"""The target seam: what boots the kernel under test, driven by `step.py` through this interface
only. A new kind of machine is a new module with one class, registered by `kind` in
`targets/__init__.py`; nothing else learns its pidfiles, domains or power switches.

Per step, in order (every call takes a Deadline, and a fault raises, never returns a verdict):

    stop()            whatever the target still runs from an earlier step (or a dead controller)
    deploy(artifacts) put the pushed artifacts (name -> path on the host) where the target
                      boots from (a disk conversion, a domain's <kernel>); nothing for a VM
                      that takes them on its command line
    start(artifacts)  boot; raises TargetStartFailed when it refused to start
    alive()           still running? (polled while waiting for the guest)
    probe(), login()  does the guest answer yet; a session in it (by default SSH to the
                      endpoint() with guest_params(), the guest's pinned host key)
    wait_off()        for init-as-reproducer boots: wait until the guest powers itself off
    fetch_console()   the serial console, as evidence (always, whatever happened)
    stop()            again, after the step

Once per run: `probes()` for `fleetbisect check` (read-only), and `restore()` when the run
ends, aborts or is resumed after a crash (put back what the target changed on the host).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping

from ..deadline import Deadline
from ..errors import InfraError
from ..remote.base import Remote, SSHParams

# `running PID` in a host's sh: the process exists and has not exited. A process that exited
# stays a zombie until its parent (init, for a daemonized QEMU) reaps it, which some inits do
# only every few seconds: `kill -0` would call it running for that long.
SH_RUNNING = 'running() { [ -e "/proc/$1" ] && ! grep -qs "^State:[[:space:]]*Z" "/proc/$1/status"; }\n'


class TargetStartFailed(InfraError):
    """The target refused to boot (QEMU exited at once, `virsh start` failed): infrastructure
    or setup, never a verdict about the kernel."""


@dataclass(frozen=True)
class Check:
    """One line of `fleetbisect check` about the target."""

    name: str
    ok: bool
    detail: str


class Target(ABC):
    kind: ClassVar[str]
    reboots_host: ClassVar[bool] = False  # the host itself reboots each step (its lease reconnects)
    min_free_mb: ClassVar[int | None] = None  # room the work dir needs (None: check's default)

    def __init__(self, host_cfg, playbook):
        self.host_cfg = host_cfg
        self.config = host_cfg.target
        self.playbook = playbook

    # --- once per run ---------------------------------------------------------------------

    def probes(self, host: Remote, deadline: Deadline) -> list[Check]:
        """Read-only checks for `fleetbisect check`."""
        return []

    def restore(self, host: Remote, deadline: Deadline) -> str:
        """Put back what the run changed on the host; returns what was done (for the log)."""
        return ""

    # --- per step -------------------------------------------------------------------------

    def connect(self, connect, deadline: Deadline) -> Remote:
        """The host's SSH session: `connect(host_cfg, deadline)`. A kind whose host may be down
        when a step begins (a bare-metal box that did not come back) brings it back first."""
        return connect(self.host_cfg, deadline)

    def link_alive(self, host: Remote) -> bool:
        """Is the way to the machine fine, so that a guest that stopped answering is its kernel's
        doing? By default the host's own connection answers."""
        from ..reproducers import host_alive

        return host_alive(host)

    def expect(self, release: str | None) -> None:
        """The release the step's build stamped (a box installs the kernel under it)."""

    @abstractmethod
    def stop(self, host: Remote, deadline: Deadline) -> str:
        """Stop what this target runs, if anything (idempotent); returns what was done."""

    def deploy(self, host: Remote, artifacts: Mapping[str, str], step_dir: Path, deadline: Deadline) -> None:
        """Put the pushed artifacts where the target boots from."""

    @abstractmethod
    def start(self, host: Remote, artifacts: Mapping[str, str], step_dir: Path, deadline: Deadline) -> None:
        """Boot the kernel under test; the commands used go to step_dir/commands.txt."""

    @abstractmethod
    def alive(self, host: Remote, deadline: Deadline) -> bool:
        """The VM (or box) still runs."""

    def endpoint(self, host: Remote):
        """How to open a stream to the guest's sshd (stages.ready.GuestEndpoint)."""
        from ..stages.ready import GuestEndpoint

        g = self.config.guest
        return GuestEndpoint(g.address, g.port, host if g.via == "host" else None)

    @property
    def reached_by(self) -> str:
        """How login() reaches the guest, for messages ("SSH", "the guest agent")."""
        return "SSH"

    def guest_params(self) -> SSHParams:
        return self.config.guest_ssh_params(self.host_cfg.name)

    def probe(self, host: Remote) -> bool:
        """Cheap and quick: does the guest answer yet? (an SSH banner, by default). Raises
        TunnelRefused when the host will never forward to it."""
        from ..stages.ready import probe_banner

        return probe_banner(self.endpoint(host))

    def login(self, host: Remote, deadline: Deadline) -> Remote:
        """A session in the guest (SSH with its pinned host key, by default)."""
        from ..remote.ssh import SSHRemote

        endpoint = self.endpoint(host)
        sock = endpoint.open(deadline.remaining()) if endpoint.via_host else None
        return SSHRemote.connect(self.guest_params(), deadline=deadline, sock=sock)

    @abstractmethod
    def wait_off(self, host: Remote, seconds: float) -> bool:
        """Wait up to `seconds` for the guest to power off; True when it did."""

    @abstractmethod
    def fetch_console(self, host: Remote, local: Path, deadline: Deadline) -> None:
        """Copy the serial console of the current (or last) boot to `local`."""
