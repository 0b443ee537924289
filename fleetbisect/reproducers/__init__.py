"""Reproducers: what runs once the guest is up, each turning what it saw into Outcomes.

A reproducer is chosen by the playbook's `reproducer.kind`; each module has one function
`run(spec, ctx) -> list[Outcome]`, and may have `preflight(spec, guest, deadline) -> str | None`:
what makes it unable to work in this guest (a destination that cannot hold the file), checked
before it runs and by `fleetbisect check`. A reproducer that cannot work is a setup error,
never a verdict: `scp-stress` into /dev/null would otherwise "fail" on every kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..deadline import Deadline
from ..remote.base import Remote
from ..verdict import Outcome, OutcomeKind


@dataclass
class ReproContext:
    guest: Remote | None  # None for a console reproducer: the guest is never reached
    host: Remote
    step_dir: Path
    log: Callable[[str], None]
    log_name: str = "reproducer.log"  # evidence file of this run (several when composed/repeated)
    target: object = None  # targets.Target that booted the guest (the console reproducer waits on it)
    vm_started: float = 0.0  # time.monotonic() when the target started
    release: str | None = None  # the kernel release the build stamped
    # The host connection's generation when the guest session was opened (SSHRemote.generation):
    # a guest lost while the host link was cut and reconnected under it is the link's fault.
    host_generation: int | None = None

    @property
    def log_path(self) -> Path:
        return self.step_dir / self.log_name


def host_alive(host: Remote) -> bool:
    """Checked over the host's own connection: a dead host is infra, never a kernel verdict."""
    try:
        return host.run(["true"], deadline=Deadline.after(15)).ok
    except Exception:  # noqa: BLE001 - any failure here means we cannot trust the host
        return False


def host_generation(host: Remote) -> int | None:
    """How many times the host connection was (re)established, when the remote counts it."""
    return getattr(host, "generation", None)


def guest_lost(ctx: ReproContext, what: str, kind: OutcomeKind, details: dict) -> Outcome:
    """The guest stopped answering: the kernel's fault only if the host is fine and the host
    connection held the whole time (with `via: host` the guest session rides it)."""
    evidence = (ctx.log_name,)
    link_alive = getattr(ctx.target, "link_alive", None)  # a box: its BMC, since it is the host
    if not (link_alive(ctx.host) if link_alive else host_alive(ctx.host)):
        return Outcome(OutcomeKind.INFRA_ERROR, f"host stopped answering too ({what})", details, evidence)
    now = host_generation(ctx.host)
    if ctx.host_generation is not None and now is not None and now != ctx.host_generation:
        return Outcome(
            OutcomeKind.INFRA_ERROR,
            f"the connection to the host dropped and was re-established meanwhile: the link, "
            f"not the kernel ({what})", details, evidence,
        )
    return Outcome(kind, what, details, evidence)


def _module(kind: str):
    from . import boot_time, command, console, dmesg, scp_stress

    kinds = {"scp-stress": scp_stress, "command": command, "dmesg": dmesg, "boot-time": boot_time,
             "console": console}
    try:
        return kinds[kind]
    except KeyError:
        raise ValueError(f"unknown reproducer {kind!r} (valid: {', '.join(sorted(kinds))})") from None


def run(spec, ctx: ReproContext) -> list[Outcome]:
    return _module(spec.kind).run(spec, ctx)


def preflight(spec, guest: Remote, deadline: Deadline) -> str | None:
    """Why this reproducer cannot work in `guest`, or None (also when it has no preflight)."""
    check: Callable[..., str | None] | None = getattr(_module(spec.kind), "preflight", None)
    return check(spec, guest, deadline) if check else None
