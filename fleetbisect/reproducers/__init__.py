"""Reproducers: what runs once the guest is up, each turning what it saw into Outcomes.

A reproducer is chosen by the playbook's `reproducer.kind`; each module registers one function
`run(spec, ctx) -> list[Outcome]`.
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
    vm: object = None  # stages.boot_qemu.VMPaths of the running VM
    vm_started: float = 0.0  # time.monotonic() when QEMU started
    release: str | None = None  # the kernel release the build stamped

    @property
    def log_path(self) -> Path:
        return self.step_dir / self.log_name


def host_alive(host: Remote) -> bool:
    """Checked over the host's own connection: a dead host is infra, never a kernel verdict."""
    try:
        return host.run(["true"], deadline=Deadline.after(15)).ok
    except Exception:  # noqa: BLE001 - any failure here means we cannot trust the host
        return False


def guest_lost(ctx: ReproContext, what: str, kind: OutcomeKind, details: dict) -> Outcome:
    """The guest stopped answering: the kernel's fault only if the host is fine."""
    evidence = (ctx.log_name,)
    if host_alive(ctx.host):
        return Outcome(kind, what, details, evidence)
    return Outcome(OutcomeKind.INFRA_ERROR, f"host stopped answering too ({what})", details, evidence)


def run(spec, ctx: ReproContext) -> list[Outcome]:
    from . import boot_time, command, console, dmesg, scp_stress

    kinds: dict[str, Callable[..., list[Outcome]]] = {
        "scp-stress": scp_stress.run,
        "command": command.run,
        "dmesg": dmesg.run,
        "boot-time": boot_time.run,
        "console": console.run,
    }
    try:
        fn = kinds[spec.kind]
    except KeyError:
        raise ValueError(f"unknown reproducer {spec.kind!r} (valid: {', '.join(sorted(kinds))})")
    return fn(spec, ctx)
