"""console: init is the reproducer. The guest runs it as PID 1 with no network, it prints a
verdict line on the serial console and powers off; the console file on the host is all there
is to read, so nothing depends on SSH into the guest.

The kernel under test must be the one built: its release (stamped with the commit) has to
appear on the console (the kernel's `Linux version` banner, or the lab init's own line).
"""

from __future__ import annotations

import re
import time

from .. import console
from ..deadline import Deadline
from ..masking import mask_file
from ..verdict import Outcome, OutcomeKind
from . import ReproContext

def judge(text: str, spec, release: str | None, *, exited: bool) -> Outcome:
    """Pure: the outcome of one init-as-reproducer boot from its console text."""
    findings = console.classify(text)
    details: dict = {"console": [f.to_json() for f in findings[:3]], "exited": exited}
    evidence = ("console.log",)
    seen = release is None or release in text
    for name, pattern, kind in (("FAIL", spec.fail_pattern, OutcomeKind.FAIL),
                                ("PASS", spec.pass_pattern, OutcomeKind.PASS)):
        m = re.search(pattern, text, re.MULTILINE)
        if m:
            if not seen:
                return Outcome(OutcomeKind.WRONG_KERNEL,
                               f"the console says {name} but never names the built release {release!r}",
                               details, evidence)
            line = text.count("\n", 0, m.start()) + 1
            return Outcome(kind, f"console line {line}: {m.group(0).strip()[:120]}", dict(details, line=line),
                           evidence)
    crash = console.fatal(findings) or next((f for f in findings if f.kind != "warning"), None)
    if crash is not None:
        if not seen:
            return Outcome(OutcomeKind.BOOT_FAILED, f"crashed before the kernel identified itself: {crash.title}",
                           details, evidence)
        return Outcome(OutcomeKind.FAIL if crash.outcome == "fail" else OutcomeKind.HANG,
                       f"no verdict line; the kernel reported {crash.title}", details, evidence)
    if not seen:
        return Outcome(OutcomeKind.BOOT_FAILED, "the built kernel never showed up on the console", details, evidence)
    if exited:
        return Outcome(OutcomeKind.FAIL, "the guest powered off without a verdict line", details, evidence)
    return Outcome(OutcomeKind.HANG, f"no verdict line within {spec.timeout:.0f}s and the guest still runs",
                   details, evidence)


def run(spec, ctx: ReproContext) -> list[Outcome]:
    left = max(1.0, spec.timeout - (time.monotonic() - ctx.vm_started))
    exited = ctx.target.wait_off(ctx.host, left)
    local = ctx.step_dir / "console.log"
    ctx.target.fetch_console(ctx.host, local, Deadline.after(60))
    mask_file(local)
    return [judge(local.read_text(errors="replace"), spec, ctx.release, exited=exited)]
