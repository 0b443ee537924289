"""dmesg: read the guest's kernel log (after an optional trigger) and look for kernel reports.

The console classifier reads it, so `WARNING: CPU: ... at net/core/dev.c` after a
`------------[ cut here ]------------` is a `warning` finding with its function, the same as
on the serial console. A report of one of the playbook's `fail_kinds`, or a line matching one
of its `fail_patterns`, fails the step; the findings go into the outcome as evidence.
"""

from __future__ import annotations

import re

from .. import console
from ..deadline import Deadline
from ..files import write_text_masked
from ..remote.base import CommandTimedOut, RemoteError
from ..verdict import Outcome, OutcomeKind
from . import ReproContext, guest_lost


def judge(spec, text: str) -> Outcome:
    """Pure: the outcome of a kernel log."""
    findings = [f for f in console.classify(text) if f.kind in spec.fail_kinds]
    details = {"findings": [f.to_json() for f in findings[:5]]}
    if findings:
        return Outcome(OutcomeKind.FAIL, f"dmesg: {console.summary(findings)}", details)
    for pattern in spec.fail_patterns:
        m = re.search(pattern, text, re.MULTILINE)
        if m:
            return Outcome(OutcomeKind.FAIL, f"dmesg matched {pattern!r}: {m.group(0)[:200]!r}", details)
    return Outcome(OutcomeKind.PASS, "dmesg: no kernel report", details)


def run(spec, ctx: ReproContext) -> list[Outcome]:
    transcript = []
    try:
        if spec.trigger:
            res = ctx.guest.run(spec.trigger, deadline=Deadline.after(spec.timeout))
            transcript.append(f"$ {spec.trigger}\n(exit {res.exit_status})\n{res.stdout}{res.stderr}")
        res = ctx.guest.run(spec.command, deadline=Deadline.after(spec.timeout))
    except CommandTimedOut:
        write_text_masked(ctx.log_path, "\n".join(transcript))
        return [guest_lost(ctx, f"dmesg reproducer still running after {spec.timeout:.0f}s", OutcomeKind.HANG, {})]
    except RemoteError as e:
        write_text_masked(ctx.log_path, "\n".join(transcript))
        return [guest_lost(ctx, f"dmesg reproducer lost the guest: {e}", OutcomeKind.FAIL, {})]
    transcript.append(f"$ {spec.command}\n{res.stdout}")
    write_text_masked(ctx.log_path, "\n".join(transcript))
    if not res.ok:
        return [Outcome(OutcomeKind.INFRA_ERROR, f"`{spec.command}` exited {res.exit_status}: {res.stderr.strip()[:200]}",
                        {}, (ctx.log_name,))]
    out = judge(spec, res.stdout)
    return [Outcome(out.kind, out.summary, out.details, (ctx.log_name,))]


def preflight(spec, guest, deadline: Deadline) -> str | None:
    """The kernel log must be readable (dmesg_restrict and a non-root user make it fail)."""
    res = guest.run(spec.command + " >/dev/null", deadline=deadline)
    if not res.ok:
        return f"`{spec.command}` exited {res.exit_status} in the guest: {res.stderr.strip()[-200:]}"
    return None
