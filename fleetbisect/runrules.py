"""Run-level rules that keep a bisect honest, shared by every search: a setup mistake is told
apart from commits that fail, and endpoints that do not test as told stop the run."""

from __future__ import annotations

from .step import StepRecord
from .verdict import BUILD_KINDS, Verdict, never_ran


class SetupWatch:
    """Tells a setup mistake from commits that fail: when the steps of a run fail the same way
    before the built kernel could run (a refused tunnel, a QEMU that prints nothing, the wrong
    kernel every time) and no kernel has run yet, skipping commit after commit would only hide
    it. Build failures say nothing either way (a broken stretch of history is normal)."""

    REPEATS = 2

    def __init__(self) -> None:
        self.kernel_ran = False
        self.streak: list[str] = []

    def saw(self, record: StepRecord) -> None:
        if record.verdict is Verdict.ABORT or all(o.kind in BUILD_KINDS for o in record.outcomes):
            return
        sig = never_ran(record.outcomes)
        if sig is None:
            self.kernel_ran, self.streak = True, []
        else:
            self.streak.append(sig)

    def mistake(self) -> str | None:
        last = self.streak[-self.REPEATS:]
        if self.kernel_ran or len(last) < self.REPEATS or len(set(last)) != 1:
            return None
        return (f"the last {self.REPEATS} steps failed the same way before the kernel could run "
                f"({last[0]}) and no kernel has run in this run: a setup mistake (inventory, "
                "playbook, host), not the commits. Fix it and start the run again.")


def endpoint_problem(record: StepRecord, want: Verdict, role: str) -> tuple[str, str] | None:
    """(status, message) when an endpoint did not test as the user said it would, else None."""
    end, commit = role.removeprefix("endpoint-").removeprefix("calibrate-"), record.commit
    if record.verdict is not want and record.verdict is not Verdict.ABORT and never_ran(record.outcomes):
        return "setup-error", (
            f"the {end} endpoint {commit[:12]} could not be tested: {record.reason}. The kernel never "
            "ran, so this is the setup (inventory, playbook, host), not the commit: fix it and start "
            "the run again.")
    if record.verdict is Verdict.ABORT:
        return "aborted", f"the {end} endpoint {commit[:12]} could not be tested: {record.reason}"
    if record.verdict is not want:
        return "endpoint-failed", (
            f"the {end} endpoint {commit[:12]} tested {record.verdict.value}, not {want.value} "
            f"({record.reason}); bisecting this range would name a random commit. Check the range "
            "and the playbook.")
    return None
