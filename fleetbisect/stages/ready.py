"""Ready stage: the guest answers SSH, and it runs the kernel we built.

Readiness is polled fast with a cheap banner probe, because slirp accepts a TCP connection
before the guest listens and a full SSH handshake started too early can stall for seconds; the
full handshake starts only once the guest's sshd has said hello. Such an early connection also
holds its probe until the probe's timeout, so probes overlap: a new one starts every 50 ms while
up to PARALLEL earlier ones still wait, and the guest is declared ready by the first banner,
within about 50 ms of its sshd listening (measured here: every probe before that waited out its
0.5 s, which put the answer up to half a second after the guest's ready marker).
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as wait_any
from dataclasses import dataclass

from ..deadline import Deadline
from ..remote.base import Remote, RemoteError, TunnelRefused
from ..verdict import Outcome, OutcomeKind

POLL = 0.05
PROBE_TIMEOUT = 0.5
PARALLEL = 8  # probes in flight at once (each ends by PROBE_TIMEOUT)


class BootFailed(Exception):
    """The guest never became reachable; `summary` says how it looked."""

    def __init__(self, summary: str):
        self.summary = summary
        super().__init__(summary)


@dataclass
class GuestEndpoint:
    """How to open a byte stream to the guest's sshd: directly or through the host."""

    address: str
    port: int
    via_host: Remote | None = None  # an SSHRemote with open_tunnel(), when via: host

    def open(self, timeout: float):
        if self.via_host is not None:
            return self.via_host.open_tunnel(self.address, self.port, Deadline.after(timeout))
        return socket.create_connection((self.address, self.port), timeout=timeout)


def probe_banner(endpoint: GuestEndpoint, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when something at the endpoint sends an SSH banner within `timeout`."""
    try:
        stream = endpoint.open(timeout)
    except TunnelRefused:
        raise  # the host will never forward it: waiting out the boot timeout cannot help
    except Exception:  # noqa: BLE001 - whatever else stops the stream opening means "not yet"
        return False
    try:
        stream.settimeout(timeout)
        data = b""
        end = time.monotonic() + timeout
        while b"\n" not in data and time.monotonic() < end:
            chunk = stream.recv(256)
            if not chunk:
                break
            data += chunk
        return data.startswith(b"SSH-")
    except (OSError, socket.timeout, EOFError):
        return False
    finally:
        stream.close()


def wait_ready(
    alive,  # callable(deadline) -> bool: the target still runs (Target.alive on its host)
    probe,  # callable() -> bool: the guest answers (an SSH banner), quick
    connect,  # callable(deadline) -> Remote: the real login to the guest
    deadline: Deadline,
    alive_every: float = 1.0,
    reached_by: str = "SSH",
) -> tuple[Remote, float]:
    """Poll until the guest's sshd answers, then log in. Returns (guest, seconds waited).

    Raises BootFailed when QEMU exits or the deadline passes first, TunnelRefused when the
    host will not forward to the guest at all.
    """
    started = time.monotonic()
    next_alive = started + alive_every
    pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="fleetbisect-probe")
    in_flight: set = set()
    next_probe = started
    try:
        while True:
            if time.monotonic() >= next_probe and len(in_flight) < PARALLEL:
                in_flight.add(pool.submit(probe))
                next_probe = time.monotonic() + POLL
            # until a probe answers or the next one is due (never a busy loop: refused probes
            # end at once, and the next starts POLL after the last)
            pause = POLL if len(in_flight) >= PARALLEL else max(0.0, next_probe - time.monotonic())
            if in_flight:
                done, in_flight = wait_any(in_flight, timeout=pause, return_when=FIRST_COMPLETED)
            else:  # every probe so far ended (refused at once): wait for the next one's turn
                done = set()
                time.sleep(pause)
            if any(f.result() for f in done):  # result() re-raises TunnelRefused
                try:
                    return connect(deadline), time.monotonic() - started
                except RemoteError:
                    # sshd answered but the login failed: the guest may still be starting up.
                    pass
            now = time.monotonic()
            if deadline.expired:
                raise BootFailed(f"guest did not answer {reached_by} within {deadline.seconds:.0f}s")
            if now >= next_alive:
                next_alive = now + alive_every
                # its own deadline: near the end of the boot's, a sub-deadline would leave the
                # check milliseconds and turn a guest that never answered into an infra-error
                if not alive(Deadline.after(15)):
                    raise BootFailed(f"QEMU exited before the guest answered {reached_by}")
    finally:
        # probes still waiting end by their own timeout; nobody waits for them
        pool.shutdown(wait=False, cancel_futures=True)


def verify_kernel(guest: Remote, command: str, expected: str | None, deadline: Deadline) -> Outcome | None:
    """A WRONG_KERNEL outcome when the guest runs something else than the build; None if fine."""
    res = guest.run(command, deadline=deadline)
    running = res.stdout.strip()
    if not res.ok:
        return Outcome(
            OutcomeKind.WRONG_KERNEL,
            f"cannot tell which kernel runs: `{command}` exited {res.exit_status}",
        )
    if expected is not None and running != expected:
        return Outcome(
            OutcomeKind.WRONG_KERNEL,
            f"guest runs {running!r}, the build is {expected!r}",
            {"running": running, "expected": expected},
        )
    return None


def kernel_identity(playbook) -> tuple[str, str]:
    """How a step proves the guest runs the kernel it built: ("verified" | "release-only" |
    "not-verified", why). Said out loud by `check`, the run and the report when it is weak."""
    build = playbook.build
    if playbook.console_only:
        return "not-verified", ("a console reproducer never reaches the guest: nothing checks which "
                                "kernel booted")
    if build.release_file is None:
        return "not-verified", ("build.release_file is null: a guest that boots another kernel would "
                                "be judged as this commit")
    if not build.localversion:
        return "release-only", (f"`{playbook.verify.command}` must print {build.release_file}, which "
                                "two commits can share (build.localversion: false)")
    return "verified", (f"`{playbook.verify.command}` must print {build.release_file}, stamped "
                        "-fb<commit> through LOCALVERSION")
