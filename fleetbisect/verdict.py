"""Outcomes become verdicts: pure functions, no I/O.

An *outcome* is what one reproducer run (or a stage that stopped the step) showed; a *verdict*
is what the step tells the search. The rules that keep a bisect honest live here and only here:
a step that could not really test the commit is never good or bad.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Sequence


class OutcomeKind(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    HANG = "hang"
    BOOT_FAILED = "boot-failed"
    WRONG_KERNEL = "wrong-kernel"
    BUILD_FAILED = "build-failed"
    BUILD_TIMEOUT = "build-timeout"  # the build ran out of time: nothing is known of the commit
    INFRA_ERROR = "infra-error"
    # The setup cannot test any commit (a reproducer that cannot work, a host that refuses the
    # guest tunnel, a build that ignores the release stamp): abort with the reason, at once.
    SETUP_ERROR = "setup-error"
    UNRELATED = "unrelated"  # a failure, but not the one the playbook's signature bisects


class Verdict(str, enum.Enum):
    GOOD = "good"
    BAD = "bad"
    SKIP = "skip"
    ABORT = "abort"

    @property
    def exit_code(self) -> int:
        """The `git bisect run` contract."""
        return {"good": 0, "bad": 1, "skip": 125, "abort": 128}[self.value]


# Outcomes that say nothing about the kernel under test: never good, never bad.
UNTESTED = frozenset({
    OutcomeKind.WRONG_KERNEL, OutcomeKind.BUILD_FAILED, OutcomeKind.BUILD_TIMEOUT, OutcomeKind.INFRA_ERROR,
    OutcomeKind.SETUP_ERROR, OutcomeKind.UNRELATED,
})


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    summary: str
    details: Mapping[str, object] = field(default_factory=dict)
    evidence: Sequence[str] = ()  # paths relative to the step directory

    def to_json(self) -> dict:
        return {
            "kind": self.kind.value,
            "summary": self.summary,
            "details": dict(self.details),
            "evidence": list(self.evidence),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Outcome":
        return cls(OutcomeKind(d["kind"]), d["summary"], d.get("details", {}), tuple(d.get("evidence", ())))


DEFAULT_POLICY: Mapping[OutcomeKind, str] = {
    OutcomeKind.PASS: "good",
    OutcomeKind.FAIL: "bad",
    OutcomeKind.HANG: "bad",
    OutcomeKind.BOOT_FAILED: "skip",
    OutcomeKind.WRONG_KERNEL: "skip",
    OutcomeKind.BUILD_FAILED: "skip",
    OutcomeKind.BUILD_TIMEOUT: "skip",
    OutcomeKind.INFRA_ERROR: "retry",
    OutcomeKind.SETUP_ERROR: "abort",
    OutcomeKind.UNRELATED: "skip",
}


@dataclass(frozen=True)
class Decision:
    verdict: Verdict | None  # None: retry the step (an infrastructure fault with retries left)
    reason: str


def decide(
    outcomes: Sequence[Outcome],
    policy: Mapping[OutcomeKind, str] = DEFAULT_POLICY,
    *,
    attempt: int = 1,
    retries: int = 2,
) -> Decision:
    """The verdict of one step from the outcomes of its reproducer runs.

    - Any outcome the policy calls bad makes the step bad (a regression shows once is enough),
      unless an untested outcome is present too: then we cannot trust the run at all.
    - An infrastructure fault is retried `retries` times, then aborts the run.
    - Nothing but explicit policy can turn an outcome into good or bad, and the untested kinds
      can never be (the playbook validator refuses such a policy; checked again here).
    """
    if not outcomes:
        return Decision(Verdict.SKIP, "no outcome recorded")
    mapped = [(o, policy.get(o.kind, DEFAULT_POLICY[o.kind])) for o in outcomes]
    for o, action in mapped:
        if o.kind in UNTESTED and action in ("good", "bad"):
            raise ValueError(f"policy maps {o.kind.value} to {action}: refused, it is untested")

    for o, action in mapped:
        if o.kind is OutcomeKind.INFRA_ERROR or action == "retry":
            if action == "retry" and attempt <= retries:
                return Decision(None, f"{o.kind.value}: {o.summary} (retry {attempt}/{retries})")
            if action in ("retry", "abort"):
                return Decision(Verdict.ABORT, f"{o.kind.value}: {o.summary}")
            return Decision(Verdict(action), f"{o.kind.value}: {o.summary}")
    for o, action in mapped:
        if action == "abort":
            return Decision(Verdict.ABORT, f"{o.kind.value}: {o.summary}")
    for o, action in mapped:
        if o.kind in UNTESTED or action == "skip":
            return Decision(Verdict.SKIP, f"{o.kind.value}: {o.summary}")
    for o, action in mapped:
        if action == "bad":
            return Decision(Verdict.BAD, f"{o.kind.value}: {o.summary}")
    return Decision(Verdict.GOOD, f"{len(outcomes)} run(s): " + "; ".join(o.summary for o in outcomes))


# A step that stopped at the build: says nothing about the kernel, nor about the setup.
BUILD_KINDS = frozenset({OutcomeKind.BUILD_FAILED, OutcomeKind.BUILD_TIMEOUT})

# Outcomes that show the kernel under test never ran: the host, the link or the setup failed
# first, the guest ran another kernel, or QEMU never got a word out of it.
_NEVER_RAN = frozenset({OutcomeKind.INFRA_ERROR, OutcomeKind.SETUP_ERROR, OutcomeKind.WRONG_KERNEL})


def never_ran(outcomes: Sequence[Outcome]) -> str | None:
    """A signature of how a step failed before the built kernel could run, or None when the
    kernel ran (or the step is a build failure, which a broken commit explains by itself).

    Two steps with the same signature in a run where no kernel has run yet are a setup
    mistake, not two commits that fail the same way."""
    if not outcomes:
        return None
    sigs = []
    for o in outcomes:
        silent_boot = o.kind is OutcomeKind.BOOT_FAILED and o.details.get("console_silent")
        if o.kind not in _NEVER_RAN and not silent_boot:
            return None
        sigs.append(f"{o.kind.value}: {_shape(o.summary)}")
    return "; ".join(sigs)


def _shape(text: str) -> str:
    """The summary with its numbers and commit ids blanked: the same failure, commit after
    commit, has the same shape."""
    import re

    return re.sub(r"\b[0-9a-f]{7,40}\b|\d+(?:\.\d+)?", "#", text)
