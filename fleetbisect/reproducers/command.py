"""command: run a command in the guest (or on the host) under a timeout; exit status and
output patterns decide."""

from __future__ import annotations

import re

from ..deadline import Deadline
from ..files import write_text_masked
from ..remote.base import CommandTimedOut, RemoteError
from ..verdict import Outcome, OutcomeKind
from ..remote.local import OutputTail
from . import ReproContext, guest_lost
from .watch import Watch


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
    deadline = Deadline.after(spec.timeout)
    if spec.stall is not None and hasattr(where, "abort"):
        return _watched(spec, ctx, where, deadline)
    try:
        res = where.run(spec.command, deadline=deadline)
    except CommandTimedOut as e:
        partial = e.partial
        write_text_masked(log_path, (partial.stdout + partial.stderr) if partial else "")
        return [guest_lost(ctx, f"command still running after {spec.timeout:.0f}s", OutcomeKind.HANG, {})]
    except RemoteError as e:
        return [guest_lost(ctx, f"command lost its connection: {e}", OutcomeKind.FAIL, {})]
    return _judged(spec, ctx, res)


def _judged(spec, ctx: ReproContext, res, details: dict | None = None) -> list[Outcome]:
    write_text_masked(ctx.log_path, f"$ {spec.command}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}\n")
    out = judge(spec, res.exit_status, res.stdout + res.stderr)
    return [Outcome(out.kind, out.summary, {**out.details, **(details or {})}, (ctx.log_name,))]


def _watched(spec, ctx: ReproContext, where, deadline: Deadline) -> list[Outcome]:
    """`stall:` asked for: output (stdout or stderr) is watched as it comes, and a command that
    prints nothing for `stall` seconds is a hang at once (its connection is cut to stop it)."""
    heard = OutputTail()
    watch = Watch(spec.stall, where.abort, deadline=deadline)

    def output(data: bytes) -> None:
        heard.add(data)
        watch.progress(watch.done + len(data))

    try:
        with watch:
            res = where.run(spec.command, deadline=deadline, output=output)
    except RemoteError as e:
        write_text_masked(ctx.log_path, f"$ {spec.command}\n--- output (as it came)\n{heard.text()}\n")
        details = {"output": watch.evidence()}
        if watch.stalled:
            return [guest_lost(ctx, f"command printed nothing for {spec.stall:g}s (after {watch.done} bytes "
                                    f"of output)", OutcomeKind.HANG, details)]
        if watch.timed_out or isinstance(e, CommandTimedOut):
            return [guest_lost(ctx, f"command still running after {spec.timeout:.0f}s", OutcomeKind.HANG, details)]
        return [guest_lost(ctx, f"command lost its connection: {e}", OutcomeKind.FAIL, details)]
    return _judged(spec, ctx, res, {"output": watch.evidence()})
