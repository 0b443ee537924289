"""A run driven by a search (`kary`, `bayes`) over one executor per host, asynchronously.

    endpoints (deterministic) or calibration (flaky) ─▶ search ─▶ confirmation (deterministic)

Every idle host gets what the search proposes for it; a result goes to the search at once, and a
test in flight whose result can no longer matter is cancelled (its VM stopped, the host kept)
and the host gets a useful commit. A host whose steps keep failing for infrastructure reasons
(or that cannot be reached, or whose lease is lost) is set aside for the run with a message; the
run goes on with fewer hosts and says so.

Resume: the search is rebuilt from the journal's finished steps (`Search.replay`), in order;
the steps the dead controller had in flight are proposed again. Calibration runs already done
are counted, not repeated.

Flaky: each run is its own boot (a step; `policy.repeats` stays the repeats inside one boot),
the bad end is run `policy.calibrate` times and the good end half as many before bisecting: the
hit rate is estimated (Wilson interval) and a good end that ever fails stops the run.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Callable

from .executor import Done, Executor, Task
from .journal import Journal, RunState
from .report import Report
from .runrules import SetupWatch, endpoint_problem
from .search import CommitGraph, Result, Search, select
from .search.bayes import Calibration
from .search.gitbisect import git, subject
from .step import StepRecord
from .verdict import OutcomeKind, Verdict

SET_ASIDE_AFTER = 2  # steps in a row that a host could not run (infra), each after its retries
SEARCH_ROLES = ("bisect", "run")  # the steps whose results the search was given


def search_name(requested: str | None, playbook, hosts: int) -> str:
    """`--search` wins, then the playbook's policy.search; auto: bayes for a flaky reproducer,
    git's bisect for one host, kary for several."""
    name = requested or playbook.policy.search
    if name == "auto":
        return "bayes" if playbook.policy.flaky else ("bisect" if hosts == 1 else "kary")
    return name


class Fleet:
    def __init__(self, spec, state: RunState, hosts: list, playbook, run_dir: Path, ui, journal: Journal,
                 report: Report, hooks, token: str, *, leased, build_ahead: Callable[[list[str]], None] | None = None,
                 build=None):
        self.spec, self.state, self.playbook, self.run_dir = spec, state, playbook, run_dir
        self.ui, self.journal, self.report, self.hooks = ui, journal, report, hooks
        self.results: "queue.Queue[Done]" = queue.Queue()
        self.executors = {
            h.name: Executor(h, playbook, spec.repo, run_dir, spec.run_id, token, ui.for_host(h.name), self.results,
                             leased=leased, build=build)
            for h in hosts
        }
        self.idle = [h.name for h in hosts]
        # Build-ahead: told, after every dispatch, which commits the search may ask for once the
        # tests in flight come back, either way. `build`: the run's build stage, one cache (and its
        # builds ahead) for every host (stages/buildahead.py Builds).
        self.build_ahead = build_ahead
        self.busy: dict[str, Task] = {}
        self.aside: dict[str, str] = {}
        self.failures: dict[str, int] = {}
        self.index = state.last_index
        self.stopped = False
        self.setup = SetupWatch()
        for rec in state.steps:
            self.setup.saw(StepRecord.from_json(rec))
        policy = playbook.policy
        self.flaky = spec.search == "bayes"
        self.options = dict(confidence=policy.confidence, budget=policy.budget) if self.flaky else {}

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> None:
        report = self.report
        for ex in self.executors.values():
            ex.start()
        try:
            if self.flaky:
                hit_rate = self._calibrate()
                if hit_rate is None:
                    return
                self.options["hit_rate"] = hit_rate
            first = self._endpoints() if self.spec.check_endpoints and not self.flaky else None
            if self.stopped:
                return
            search = self._search(first)
            if self.stopped:
                return
            self._answer(search)
            if report.culprit and not self.flaky and self.playbook.policy.confirm and not self.stopped:
                self._confirm(report.culprit)
        finally:
            for host in list(self.busy):
                self.executors[host].cancel()
            for ex in self.executors.values():
                ex.stop(timeout=180)

    def _search(self, first: tuple[list, Callable] | None = None) -> Search:
        """`first`: the endpoint tests (pending, take), given out before any search commit; the
        hosts they leave free start the search at once (an endpoint that fails stops the run)."""
        graph = CommitGraph.from_git(self.spec.repo, self.spec.good, self.spec.bad)
        done = [("record", r["commit"], r["verdict"], r.get("host")) for r in self.state.steps
                if r.get("role", "bisect") in SEARCH_ROLES and r["verdict"] != Verdict.ABORT.value]
        search = select(self.spec.search).replay(graph, done, **self.options)
        role = "run" if self.flaky else "bisect"
        self.ui.step(f"{search.name} search over {graph.n} commits on {len(self.idle)} host(s): "
                     f"{', '.join(self.idle)}" + (f" (resumed after {len(done)} results)" if done else ""))
        pending, first_take = first or ([], None)

        def want(n: int) -> list[tuple[str, str]]:
            out = _pop(pending)(n)
            return out + [(c, role) for c in (search.propose(n - len(out)) if n > len(out) else [])]

        def take(task: Task, record: StepRecord, host: str) -> None:
            if task.role != role:
                return first_take(task, record, host)
            search.record(task.commit, Result(record.verdict.value), host)
            self.journal.append("observed", commit=task.commit, result=record.verdict.value, host=host)

        def started(commit: str, host: str, r: str) -> None:
            if r == role:
                search.started(commit, host)

        def withdraw(task: Task, host: str) -> None:
            if task.role == role:
                search.withdraw(task.commit, host)
            else:
                pending.append((task.commit, task.role))

        self._drain(want, take, started=started, withdraw=withdraw, cancel=search.cancel, upcoming=search.upcoming)
        write_logs(self.run_dir, search, self.spec)
        return search

    def _answer(self, search: Search) -> None:
        report, ans = self.report, search.answer()
        report.search_answer = ans.to_json()
        if ans.culprit:
            report.status, report.culprit = "found", ans.culprit
            report.culprit_subject = subject(self.spec.repo, ans.culprit)
            report.culprit_author = git(self.spec.repo, "log", "-1", "--format=%an <%ae>", ans.culprit).stdout.strip()
            report.message = f"{ans.culprit} is the first bad commit: {report.culprit_subject}"
            if self.flaky:
                report.message += (f" (confidence {ans.confidence:.4f} after {ans.runs} runs"
                                   + (f"; runner-up {ans.runner_up[:12]}" if ans.runner_up else "") + ")")
        else:
            report.status, report.candidates = "inconclusive", list(ans.candidates)
            report.message = ans.log[-1] if ans.log else "no answer"

    # -- endpoints and calibration --------------------------------------------------------------
    def _endpoints(self) -> tuple[list, Callable] | None:
        """Good end good, bad end bad, or the search would mean nothing: the tests still to run
        and what to do with their results (for `_search`), or None when a decided one failed."""
        wants = {self.spec.good: (Verdict.GOOD, "endpoint-good"), self.spec.bad: (Verdict.BAD, "endpoint-bad")}
        pending = [(c, role) for c, (_, role) in wants.items()]
        for c, (want, role) in wants.items():
            rec = self.state.decided.get(c)
            if rec is not None and rec["verdict"] != Verdict.ABORT.value and rec.get("role") == role:
                pending.remove((c, role))
                if self._stop_on(endpoint_problem(StepRecord.from_json(rec), want, role)):
                    return None

        def take(task: Task, record: StepRecord, host: str) -> None:
            self._stop_on(endpoint_problem(record, wants[task.commit][0], task.role))

        return pending, take

    def _calibrate(self) -> float | None:
        """Run the bad end until the hit rate is estimated and the good end for false alarms."""
        policy, spec = self.playbook.policy, self.spec
        counts = {"calibrate-bad": [0, 0], "calibrate-good": [0, 0]}  # [runs, failures]
        for r in self.state.steps:
            if r.get("role") in counts and r["verdict"] in ("good", "bad"):
                counts[r["role"]][0] += 1
                counts[r["role"]][1] += r["verdict"] == "bad"
        pending = ([(spec.bad, "calibrate-bad")] * max(0, policy.calibrate - counts["calibrate-bad"][0])
                   + [(spec.good, "calibrate-good")] * max(0, policy.calibrate // 2 - counts["calibrate-good"][0]))
        if pending:
            self.ui.step(f"calibrating the reproducer: {len(pending)} runs of the ends, each its own boot")

        def take(task: Task, record: StepRecord, host: str) -> None:
            if record.verdict in (Verdict.GOOD, Verdict.BAD):
                counts[task.role][0] += 1
                counts[task.role][1] += record.verdict is Verdict.BAD
            else:
                want = Verdict.BAD if task.role == "calibrate-bad" else Verdict.GOOD
                self._stop_on(endpoint_problem(record, want, task.role))

        self._drain(_pop(pending), take, withdraw=lambda t, h: pending.append((t.commit, t.role)))
        if self.stopped:
            return None
        (bad_runs, hits), (good_runs, alarms) = counts["calibrate-bad"], counts["calibrate-good"]
        if hits == 0:
            return self._calibration_failed(f"the bad end {spec.bad[:12]} never failed in {bad_runs} runs: "
                                            "nothing to bisect (check the range and the reproducer)")
        if alarms:
            return self._calibration_failed(
                f"the good end {spec.good[:12]} failed {alarms} of {good_runs} runs: the reproducer fails "
                "on good kernels too, so a flaky search would name a random commit")
        cal = Calibration.from_runs(hits, bad_runs)
        hit_rate = min(0.999, (cal.low + cal.high) / 2)  # the interval's centre: never 1 from few runs
        self.report.calibration = {"hit_rate": cal.estimate, "low": cal.low, "high": cal.high, "level": cal.level,
                                   "runs": bad_runs, "failures": hits, "good_runs": good_runs,
                                   "used": round(hit_rate, 4)}
        self.journal.append("calibrated", **self.report.calibration)
        self.ui.info(f"hit rate of the bad end: {cal}; the good end passed all {good_runs} runs")
        return hit_rate

    def _calibration_failed(self, message: str) -> None:
        self.report.status, self.report.message = "endpoint-failed", message
        self.stopped = True
        return None

    def _confirm(self, culprit: str) -> None:
        parent = git(self.spec.repo, "rev-parse", f"{culprit}^").stdout.strip()
        wants = {culprit: (Verdict.BAD, "confirm-culprit"), parent: (Verdict.GOOD, "confirm-parent")}
        pending = [(c, role) for c, (_, role) in wants.items()] * self.playbook.policy.confirm
        failed: list[str] = []

        def take(task: Task, record: StepRecord, host: str) -> None:
            if record.verdict is not wants[task.commit][0]:
                failed.append(f"{task.role.removeprefix('confirm-')} {task.commit[:12]} tested "
                              f"{record.verdict.value} on {host} ({record.reason})")

        self._drain(_pop(pending), take, withdraw=lambda t, h: pending.append((t.commit, t.role)))
        if self.stopped:
            return
        self.report.confirmed = not failed
        if failed:
            self.report.status = "unconfirmed"
            self.report.message = (f"the search pointed at {culprit} ({self.report.culprit_subject}), but it did "
                                   "NOT hold on retest: " + "; ".join(failed) + " (a flaky reproducer? set "
                                   "policy.flaky)")
            self.ui.warn("the culprit did not hold on retest: " + "; ".join(failed))
        else:
            self.ui.good(f"confirmed: {culprit[:12]} is bad and its parent {parent[:12]} good on retest")

    # -- dispatch -------------------------------------------------------------------------------
    def _drain(self, want: Callable[[int], list[tuple[str, str]]], take, *, started=None, withdraw=None,
               cancel=lambda: [], upcoming=None) -> None:
        """Keep the idle hosts busy with what `want(n)` gives, hand each result to `take`, until
        nothing is proposed and nothing is in flight (or the run stopped)."""
        while not self.stopped:
            for commit in cancel():
                self._cancel(commit)
            if self.idle:
                for (commit, role), host in zip(want(len(self.idle)), list(self.idle)):
                    if started:
                        started(commit, host, role)
                    self._give(host, commit, role)
                if upcoming and self.build_ahead and self.busy:
                    self._ahead(upcoming())
            if not self.busy:
                return
            self._handle(self._next(), take, withdraw)

    def _ahead(self, commits: list[str]) -> None:
        try:
            self.build_ahead(commits)
        except Exception as e:  # noqa: BLE001 - a builder's fault only costs time, never a verdict
            self.ui.warn(f"build-ahead failed: {type(e).__name__}: {e}")

    def _next(self) -> Done:
        while True:  # a timeout, so that Ctrl-C reaches the controller at once
            try:
                return self.results.get(timeout=1)
            except queue.Empty:
                continue

    def _give(self, host: str, commit: str, role: str) -> None:
        self.idle.remove(host)
        self.index += 1
        task = Task(self.index, commit, subject(self.spec.repo, commit), role)
        self.busy[host] = task
        self.journal.append("step-started", index=task.index, commit=commit, role=role, host=host)
        what = "" if role == "bisect" else f" ({role})"
        self.ui.step(f"step {task.index}{what} on {host}: {commit[:12]} {task.subject}")
        self.ui.event("step-started", index=task.index, commit=commit, subject=task.subject, role=role, host=host)
        self.executors[host].give(task)

    def _cancel(self, commit: str) -> None:
        for host, task in self.busy.items():
            if task.commit == commit and not task.cancelled:
                self.ui.info(f"{host}: cancelling step {task.index} ({commit[:12]}): its result no longer matters")
                self.executors[host].cancel()
                return

    def _handle(self, done: Done, take, withdraw) -> None:
        host, task = done.host, self.busy.pop(done.host, None)
        if done.error:
            self._set_aside(host, done.error)
            if task is not None and not task.cancelled and withdraw:
                withdraw(task, host)
            return
        if task is None:
            return
        if done.record is None or task.cancelled:
            self.journal.append("step-cancelled", index=task.index, commit=task.commit, host=host)
            self.ui.event("step-finished", index=task.index, commit=task.commit, verdict="cancelled",
                          reason="cancelled", host=host)
            self.idle.append(host)
            return
        record = done.record
        self.journal.append("step-finished", record=record.to_json(), host=host)
        self.ui.event("step-finished", index=task.index, commit=task.commit, verdict=record.verdict.value,
                      reason=record.reason, durations=record.durations, host=host)
        self.report.steps.append(record)
        self.report.step_hosts[record.index] = host
        self.report.write()
        shown = f"step {record.index} on {host}: {task.commit[:12]} is {record.verdict.value} ({record.reason})"
        (self.ui.good if record.verdict is Verdict.GOOD else self.ui.info)(shown)
        self.hooks.fire("verdict", commit=task.commit, verdict=record.verdict.value, reason=record.reason,
                        subject=record.subject, role=task.role)
        self.setup.saw(record)
        if record.verdict is Verdict.ABORT:
            if any(o.kind is OutcomeKind.INFRA_ERROR for o in record.outcomes):
                self.failures[host] = self.failures.get(host, 0) + 1
                if self.failures[host] >= SET_ASIDE_AFTER:
                    self._set_aside(host, f"{SET_ASIDE_AFTER} steps in a row failed on it: {record.reason}")
                else:
                    self.idle.append(host)
                if withdraw:
                    withdraw(task, host)
                return
            self._stop_on(("aborted", f"{task.commit[:12]} could not be tested: {record.reason}"))
            return
        self.failures[host] = 0
        self.idle.append(host)
        mistake = self.setup.mistake()
        if mistake:
            self._stop_on(("setup-error", mistake))
            return
        take(task, record, host)

    def _set_aside(self, host: str, why: str) -> None:
        if host in self.idle:
            self.idle.remove(host)
        self.aside[host] = why
        self.report.set_aside[host] = why
        self.journal.append("host-set-aside", host=host, reason=why)
        left = [h for h in self.executors if h not in self.aside]
        self.ui.warn(f"{host} is set aside for this run: {why}; going on with {len(left)} host(s)"
                     + (f" ({', '.join(left)})" if left else ""))
        self.ui.event("host-set-aside", host=host, reason=why)
        if not left:
            self._stop_on(("aborted", f"every host was set aside (last: {host}: {why})"))

    def _stop_on(self, problem: tuple[str, str] | None) -> bool:
        if problem and not self.stopped:
            self.report.status, self.report.message = problem
            self.stopped = True
        return bool(problem)


def _pop(pending: list) -> Callable[[int], list]:
    def want(n: int) -> list:
        out = pending[:n]
        del pending[:n]
        return out
    return want


def write_logs(run_dir: Path, search: Search, spec) -> None:
    """search.log (what the search saw and decided, in order) and, for a deterministic search,
    bisect.log in git's format, so that `git bisect replay bisect.log` reaches the same answer."""
    from .files import write_atomic

    write_atomic(run_dir / "search.log", "\n".join(search.answer().log) + "\n")
    if search.name != "kary":
        return
    lines = [f"git bisect start {spec.bad} {spec.good}"]
    for kind, *args in search.events:
        if kind == "record":
            lines.append(f"git bisect {args[1]} {args[0]}")
    write_atomic(run_dir / "bisect.log", "\n".join(lines) + "\n")


def fleet_started(ui, spec, hosts: list[str], count: int, run_dir: Path) -> None:
    """The run-started line and event of a fleet run."""
    ui.step(f"bisecting {count} commits of {spec.repo} on {len(hosts)} host(s) ({', '.join(hosts)}) with "
            f"the {spec.search} search; run directory {run_dir}")
    ui.event("run-started", run_id=spec.run_id, host=", ".join(hosts), hosts=hosts, commits=count,
             good=spec.good, bad=spec.bad, run_dir=str(run_dir), search=spec.search)
