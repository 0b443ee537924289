"""command: run a command in the guest (or on the host) under a timeout; exit status and
output patterns decide."""

from __future__ import annotations

import re

from ..deadline import Deadline
from ..files import write_text_masked
from ..remote.base import CommandTimedOut, RemoteError
from ..verdict import Outcome, OutcomeKind
from . import ReproContext, guest_lost


def judge(spec, exit_status: int, output: str) -> Outcome:
    """Pure: the outcome of a finished command."""
    details = {"exit_status": exit_status}
    if exit_status != spec.expect_exit:
        return Outcome(OutcomeKind.FAIL, f"exited {exit_status}, expected {spec.expect_exit}", details)
    for pattern in spec.fail_patterns:
        m = re.search(pattern, output, re.MULTILINE)
        if m:
            return Outcome(OutcomeKind.FAIL, f"output matched {pattern!r}: {m.group(0)[:200]!r}", details)
    for pattern in spec.pass_patterns:
        if not re.search(pattern, output, re.MULTILINE):
            return Outcome(OutcomeKind.FAIL, f"output lacks {pattern!r}", details)
    return Outcome(OutcomeKind.PASS, f"exited {exit_status}", details)


def run(spec, ctx: ReproContext) -> list[Outcome]:
    where = ctx.guest if spec.where == "guest" else ctx.host
    log_path = ctx.log_path
    try:
        res = where.run(spec.command, deadline=Deadline.after(spec.timeout))
    except CommandTimedOut as e:
        partial = e.partial
        write_text_masked(log_path, (partial.stdout + partial.stderr) if partial else "")
        return [guest_lost(ctx, f"command still running after {spec.timeout:.0f}s", OutcomeKind.HANG, {})]
    except RemoteError as e:
        return [guest_lost(ctx, f"command lost its connection: {e}", OutcomeKind.FAIL, {})]
    write_text_masked(log_path, f"$ {spec.command}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}\n")
    out = judge(spec, res.exit_status, res.stdout + res.stderr)
    return [Outcome(out.kind, out.summary, out.details, (ctx.log_name,))]
