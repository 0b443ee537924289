"""Outcomes meet the console: what the kernel itself said, and whether it is *our* failure.

After an attempt, the serial console (fetched from the host whatever happened) is classified
(console.py). Its reports are attached to the outcomes as evidence, so a hang reads "hang:
transfer 4/12 stalled; console: BUG: soft lockup in virtnet_poll" instead of "ssh timed out".
Then the playbook's signature, if any, is applied: a failure that is not the one being bisected
becomes `unrelated` (a skip), so an unrelated crash cannot steer the search.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .. import console
from ..verdict import Outcome, OutcomeKind

SHOWN = 3  # findings attached to an outcome; the console file has them all


def console_findings(path: Path) -> list[console.Finding]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return console.classify(text)


def explain(outcomes: list[Outcome], findings: list[console.Finding]) -> list[Outcome]:
    """Attach the console's kernel reports to every outcome that is not a pass."""
    if not findings:
        return outcomes
    out = []
    for o in outcomes:
        if o.kind in (OutcomeKind.PASS, OutcomeKind.BUILD_FAILED, OutcomeKind.INFRA_ERROR):
            out.append(o)
            continue
        details = dict(o.details)
        details["console"] = [f.to_json() for f in findings[:SHOWN]]
        evidence = tuple(o.evidence) + (() if "console.log" in o.evidence else ("console.log",))
        out.append(replace(o, summary=f"{o.summary}; console: {console.summary(findings)}",
                           details=details, evidence=evidence))
    return out


def _reports(o: Outcome) -> list[console.Finding]:
    found = [console.Finding.from_json(d) for d in o.details.get("console", ())]
    found += [console.Finding.from_json(d) for d in o.details.get("findings", ())]
    return found


def apply_signature(outcomes: list[Outcome], signature, policy: dict) -> list[Outcome]:
    """Failures that do not match the signature become UNRELATED (skip, never bad)."""
    if signature is None:
        return outcomes
    out = []
    for o in outcomes:
        if policy.get(o.kind) != "bad":
            out.append(o)
            continue
        why = None
        if signature.outcomes and o.kind.value not in signature.outcomes:
            why = f"a {o.kind.value}, the bisected failure is {' or '.join(signature.outcomes)}"
        elif signature.pattern:
            reports = _reports(o)
            if not any(console.signature_matches(f, signature.pattern) for f in reports):
                seen = "; ".join(f.title for f in reports[:2]) or "no kernel report"
                why = f"{seen} does not match the signature {signature.pattern!r}"
        if why is None:
            out.append(o)
        else:
            details = dict(o.details, was=o.kind.value)
            out.append(replace(o, kind=OutcomeKind.UNRELATED, summary=f"{o.summary} [unrelated: {why}]",
                               details=details))
    return out
