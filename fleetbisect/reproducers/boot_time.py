"""boot-time: the kernel must start userspace within `max` seconds of its own clock.

Read from the kernel log's `Run /init as init process` (or `/sbin/init`...) timestamp, which
is what a boot-time regression moves; `/proc/uptime` at login is the fallback (an upper bound,
noted as such) for kernels that print no timestamps.
"""

from __future__ import annotations

import re

from ..deadline import Deadline
from ..remote.base import RemoteError
from ..verdict import Outcome, OutcomeKind
from . import ReproContext, guest_lost

_RUN_INIT = re.compile(r"^\[\s*(\d+\.\d+)\]\s+Run (\S+) as init process", re.MULTILINE)


def userspace_at(dmesg: str, uptime: str) -> tuple[float | None, str]:
    """(seconds from kernel start to userspace, how it was measured)."""
    m = _RUN_INIT.search(dmesg)
    if m:
        return float(m.group(1)), f"kernel log: Run {m.group(2)} as init process"
    try:
        return float(uptime.split()[0]), "/proc/uptime at login (upper bound: no kernel log timestamp)"
    except (IndexError, ValueError):
        return None, "neither the kernel log nor /proc/uptime told"


def judge(spec, dmesg: str, uptime: str) -> Outcome:
    seconds, how = userspace_at(dmesg, uptime)
    if seconds is None:
        return Outcome(OutcomeKind.INFRA_ERROR, f"cannot measure the boot time: {how}")
    details = {"seconds": seconds, "max": spec.max, "measured_by": how}
    if seconds > spec.max:
        return Outcome(OutcomeKind.FAIL, f"userspace after {seconds:.2f}s, over the {spec.max:.2f}s limit", details)
    return Outcome(OutcomeKind.PASS, f"userspace after {seconds:.2f}s (limit {spec.max:.2f}s)", details)


def run(spec, ctx: ReproContext) -> list[Outcome]:
    try:
        res = ctx.guest.run("dmesg; echo '--- uptime'; cat /proc/uptime", deadline=Deadline.after(spec.timeout))
    except RemoteError as e:
        return [guest_lost(ctx, f"boot-time reproducer lost the guest: {e}", OutcomeKind.FAIL, {})]
    dmesg, _, uptime = res.stdout.partition("--- uptime\n")
    ctx.log_path.write_text(res.stdout)
    out = judge(spec, dmesg, uptime)
    return [Outcome(out.kind, out.summary, out.details, (ctx.log_name,))]
