"""boot-time: the guest must be up within `max` seconds of the kernel's own clock.

`measure: uptime` (default) reads /proc/uptime as soon as the guest answers: kernel start to a
usable system, which is what a slow probe or a slow initcall moves. `measure: init` reads the
kernel log's `Run /init as init process` timestamp (kernel start to userspace); /proc/uptime is
its fallback, noted as such, for kernels that print no timestamps.
"""

from __future__ import annotations

import re

from ..deadline import Deadline
from ..files import write_text_masked
from ..remote.base import RemoteError
from ..verdict import Outcome, OutcomeKind
from . import ReproContext, guest_lost

_RUN_INIT = re.compile(r"^\[\s*(\d+\.\d+)\]\s+Run (\S+) as init process", re.MULTILINE)


def boot_seconds(measure: str, dmesg: str, uptime: str) -> tuple[float | None, str]:
    """(seconds from kernel start, how it was measured)."""
    if measure == "init":
        m = _RUN_INIT.search(dmesg)
        if m:
            return float(m.group(1)), f"kernel log: Run {m.group(2)} as init process"
    try:
        how = "/proc/uptime once the guest answered"
        if measure == "init":
            how += " (no kernel log timestamp for init: an upper bound)"
        return float(uptime.split()[0]), how
    except (IndexError, ValueError):
        return None, "neither the kernel log nor /proc/uptime told"


def judge(spec, dmesg: str, uptime: str) -> Outcome:
    seconds, how = boot_seconds(spec.measure, dmesg, uptime)
    if seconds is None:
        return Outcome(OutcomeKind.INFRA_ERROR, f"cannot measure the boot time: {how}")
    details = {"seconds": seconds, "max": spec.max, "measured_by": how}
    if seconds > spec.max:
        return Outcome(OutcomeKind.FAIL, f"booted in {seconds:.2f}s, over the {spec.max:.2f}s limit ({how})", details)
    return Outcome(OutcomeKind.PASS, f"booted in {seconds:.2f}s, within {spec.max:.2f}s ({how})", details)


def run(spec, ctx: ReproContext) -> list[Outcome]:
    try:
        res = ctx.guest.run("cat /proc/uptime; echo '--- dmesg'; dmesg", deadline=Deadline.after(spec.timeout))
    except RemoteError as e:
        return [guest_lost(ctx, f"boot-time reproducer lost the guest: {e}", OutcomeKind.FAIL, {})]
    uptime, _, dmesg = res.stdout.partition("--- dmesg\n")
    write_text_masked(ctx.log_path, res.stdout)
    out = judge(spec, dmesg, uptime)
    return [Outcome(out.kind, out.summary, out.details, (ctx.log_name,))]
