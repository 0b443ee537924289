"""A whole bisect run: range, host, steps, culprit, report, in a run directory of its own.

Everything the run decides goes to the journal first (see journal.py), so `resume` can rebuild
the bisect from it: decided commits are replayed from the journal, never tested or marked
twice; a step the dead controller had started is tested again.
"""

from __future__ import annotations

import functools
import math
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .deadline import Deadline
from .errors import InfraError, RunAborted, UserError
from .files import write_atomic
from .hooks import EVENTS, Hooks
from . import targets
from .journal import JOURNAL, Journal, JournalError, RunLock, RunState, read, replay
from .lease import Lease, LeaseKeeper, LeaseLost
from .remote.base import RemoteError
from .report import Report
from .runspec import RunSpec, _same_host, controller, host_fingerprint  # noqa: F401 - the run's API
from .search.gitbisect import Bisect, git, resolve, subject
from .stages.build import kill_orphan_build
from .stages.buildahead import Builds, bisect_next, bisect_upcoming
from .stages.ready import kernel_identity
from .step import RETRY_PAUSE, Lab, StepRecord, connect_host, run_step
from .ui import UI, log_to_file
from .runrules import SetupWatch, endpoint_problem
from .verdict import Verdict


def start_run(
    *, repo: Path, good: str, bad: str, host, inventory: list[Path], playbook,
    playbook_path: Path, run_dir: Path, ui: UI, check_endpoints: bool | None = None,
    hooks: dict[str, list[str]] | None = None, hosts: list | None = None, search: str | None = None,
    build_ahead=None,
) -> Report:
    """Bisect `good..bad` of `repo` on `host` (or on every one of `hosts`) in a new run directory.
    `search`: bisect | kary | bayes | auto (default: the playbook's policy.search). `build_ahead`:
    called with the commits a search of its own may ask for next (a builder's hook)."""
    from .fleet import search_name

    repo = repo.resolve()
    hosts = hosts or [host]
    if len({h.name for h in hosts}) != len(hosts):
        raise UserError("a host is named twice: each host runs one step at a time")
    name = search_name(search, playbook, len(hosts))
    if name == "bisect" and len(hosts) > 1:
        raise UserError("git's bisect tests one commit at a time on one host: use --search kary (or bayes) "
                        "for several hosts")
    spec = RunSpec(
        uuid.uuid4().hex[:12], repo, resolve(repo, good), resolve(repo, bad), hosts[0].name,
        [p.resolve() for p in inventory], playbook_path.resolve(), playbook.digest,
        playbook.policy.check_endpoints if check_endpoints is None else check_endpoints, hooks or {},
        host_fingerprint(hosts[0]), [h.name for h in hosts] if name != "bisect" else [], name,
        {h.name: host_fingerprint(h) for h in hosts} if name != "bisect" else {},
    )
    me = controller()
    with RunLock(run_dir, {**me, "run_id": spec.run_id}) as lock:  # one controller per run directory
        if (run_dir / JOURNAL).exists():
            raise UserError(f"{run_dir} already holds a run: `fleetbisect resume {run_dir}` continues it")
        Journal(run_dir).append("run-started", config=spec.to_json(), controller=me)
        return _drive(spec, RunState(), hosts, playbook, run_dir, ui, me, lock, build_ahead)


def resume_run(run_dir: Path, ui: UI) -> Report:
    """Continue a run whose controller died or was interrupted; a finished run is reported."""
    from .config.inventory import load_inventory
    from .config.playbook import load_playbook

    if not (run_dir / JOURNAL).exists():
        raise JournalError(f"{run_dir} is not a fleetbisect run directory (no {JOURNAL})")
    me = controller()
    with RunLock(run_dir, me) as lock:  # a live controller of this run refuses us here
        note = Journal(run_dir).note  # cuts a torn last line, so our events start whole lines
        events, _ = read(run_dir)
        if note:
            ui.warn(note)
        state = replay(events)
        if not state.config:
            raise UserError(f"{run_dir}: the journal has no run-started event")
        spec = RunSpec.from_json(state.config)
        if state.final:
            _restore_finished(spec, me, ui)
            return _finished(spec, state, run_dir, ui)
        inventory = load_inventory(spec.inventory)
        hosts = [inventory.host(h) for h in spec.host_names]
        playbook = load_playbook(spec.playbook)
        if playbook.digest != spec.playbook_digest:
            raise UserError(
                f"{spec.playbook} changed since the run started (digest {playbook.digest[:12]}, "
                f"was {spec.playbook_digest[:12]}): its verdicts would not mean the same; "
                "restore the playbook or start a new run"
            )
        for h in hosts:
            _same_host(spec, h)
        killed = kill_orphan_build(run_dir)  # under the lock: it is no live controller's build
        if killed:
            ui.warn(f"stopped a build the previous controller left running (pid {', '.join(map(str, killed))})")
        if state.finished:
            ui.info(f"{run_dir}: the run had stopped ({state.finished.get('status')}); continuing it")
        Journal(run_dir).append("resumed", decided=len(state.decided), marks=len(state.marks),
                                controller=me)
        return _drive(spec, state, hosts, playbook, run_dir, ui, me, lock)


def _restore_finished(spec: RunSpec, me: dict, ui: UI) -> None:
    """A run that has its answer but whose controller died before putting the target back (a
    domain's saved definition): put it back now, under the host's lease. Never raises."""
    from .config.inventory import load_inventory
    from .config.playbook import load_playbook

    try:
        host = load_inventory(spec.inventory).host(spec.host)
        playbook = load_playbook(spec.playbook)
    except UserError as e:
        ui.warn(f"cannot check whether {spec.host}'s target needs restoring: {e}")
        return
    if type(targets.for_host(host, playbook)).restore is targets.Target.restore:
        return
    try:
        with leased(host, spec.run_id, playbook.policy.retries, ui, me["token"]):
            _restore_target(host, playbook, ui)
    except RunAborted as e:
        ui.warn(f"could not restore {spec.host}'s target: {e}")


def _finished(spec: RunSpec, state: RunState, run_dir: Path, ui: UI) -> Report:
    """`resume` of a run that already has its answer: report it, test nothing, fire no hook."""
    from .report import load

    fin = state.finished or {}
    report = Report(run_dir, str(spec.repo), spec.good, spec.bad, spec.host, str(spec.playbook),
                    spec.playbook_digest)
    report.status, report.culprit = fin.get("status", "?"), fin.get("culprit")
    report.confirmed, report.message = fin.get("confirmed"), fin.get("message", "")
    try:
        data = load(run_dir)
        report.culprit_subject, report.culprit_author = data.get("culprit_subject"), data.get("culprit_author")
    except (UserError, ValueError, OSError):  # report.json lost: the journal holds the answer
        pass
    ui.info(f"{run_dir}: the run already finished ({report.status}) after {len(state.steps)} steps; "
            "nothing to resume")
    if not ui.quiet and (run_dir / "report.json").exists():
        from .report import show

        show(run_dir, ui.console)  # on stderr: stdout keeps only the answer (or --json events)
    ui.event("run-finished", status=report.status, culprit=report.culprit, confirmed=report.confirmed,
             message=report.message, resumed=False)
    return report


def _drive(spec: RunSpec, state: RunState, hosts: list, playbook, run_dir: Path, ui: UI, me: dict,
           lock: RunLock, build_ahead=None) -> Report:
    names = spec.host_names
    with log_to_file(run_dir / "run.log"):
        journal = Journal(run_dir)
        report = Report(
            run_dir, str(spec.repo), spec.good, spec.bad, ", ".join(names), str(spec.playbook),
            spec.playbook_digest,
        )
        report.search = spec.search
        report.steps = [StepRecord.from_json(s) for s in state.steps]
        report.step_hosts = {s["index"]: s["host"] for s in state.steps if s.get("host")}
        report.kernel_identity, report.kernel_identity_note = kernel_identity(playbook)
        if report.kernel_identity != "verified":
            ui.warn(f"the running kernel's identity is {report.kernel_identity}: {report.kernel_identity_note}")
        report.write()
        hooks = Hooks(
            {e: [*getattr(playbook.hooks, e), *spec.hooks.get(e, [])] for e in EVENTS}, ui,
            {"run_id": spec.run_id, "run_dir": str(run_dir), "host": ", ".join(names)}, run_dir / "hooks.log",
        )
        count = int(git(spec.repo, "rev-list", "--count", f"{spec.good}..{spec.bad}").stdout.strip() or 0)
        if spec.search == "bisect":
            ui.step(
                f"bisecting {count} commits of {spec.repo} on {spec.host} (about "
                f"{max(1, math.ceil(math.log2(max(count, 2))))} steps); run directory {run_dir}"
            )
            ui.event("run-started", run_id=spec.run_id, host=spec.host, commits=count,
                     good=spec.good, bad=spec.bad, run_dir=str(run_dir))
        else:
            from .fleet import fleet_started

            fleet_started(ui, spec, names, count, run_dir)
        if not state.steps:
            hooks.fire("start", good=spec.good, bad=spec.bad)
        started = time.monotonic()
        try:
            if spec.search == "bisect":
                _bisect(spec, state, hosts[0], playbook, run_dir, ui, me, lock, journal, report, hooks)
            else:
                _fleet(spec, state, hosts, playbook, run_dir, ui, me, lock, journal, report, hooks, build_ahead)
            ui.detail(f"run took {time.monotonic() - started:.1f}s over {len(report.steps)} steps")
        except RunAborted as e:  # the host never answered: nothing was tested or marked
            if report.status == "running":
                report.status, report.message = "aborted", str(e)
                report.write()
                journal.append("run-finished", status=report.status, culprit=None, message=report.message)
                hooks.fire("failure", status=report.status, message=report.message)
            raise RunAborted(f"{e}; once that is fixed, `fleetbisect resume {run_dir}` continues the run") from None
    if report.status == "aborted":
        raise RunAborted(f"{report.message}; once that is fixed, `fleetbisect resume {run_dir}` continues the run")
    if report.status == "setup-error":
        raise RunAborted(report.message)
    return report


def _finish(journal: Journal, report: Report, hooks: Hooks, ui: UI) -> None:
    """The report written, and (unless interrupted) the journal's and the hooks' last word."""
    report.write()
    if report.status not in ("interrupted", "running"):  # "running": a bug escaped
        journal.append("run-finished", status=report.status, culprit=report.culprit,
                       confirmed=report.confirmed, message=report.message)
        hooks.fire("finish" if report.status == "found" else "failure", status=report.status,
                   culprit=report.culprit, message=report.message)
    ui.event("run-finished", status=report.status, culprit=report.culprit,
             confirmed=report.confirmed, message=report.message)


def _interrupted(journal: Journal, report: Report) -> None:
    journal.guard = None
    report.status = "interrupted"
    report.message = f"interrupted; `fleetbisect resume {report.run_dir}` continues the run"
    journal.append("interrupted")


def _bisect(spec, state, host, playbook, run_dir, ui, me, lock, journal, report, hooks) -> None:
    """One host, git's own bisect."""
    with leased(host, spec.run_id, playbook.policy.retries, ui, me["token"], lock.heartbeat) as keeper:
        # A controller that lost its lease records no decision: the next journal event
        # (a step starting, a verdict) raises LeaseLost and the run stops, resumable.
        journal.guard = keeper.check
        bisect = Bisect.create(spec.repo, run_dir / "worktree", spec.good, spec.bad)
        builds = Builds(spec.repo, playbook, run_dir, ui.detail, home=bisect.tree)  # cache; builds ahead
        lab = Lab(bisect.tree, host, playbook, ui, lease=keeper, background_cleanup=True, build=builds.build)
        run = _Run(spec, state, lab, journal, report, bisect, hooks, ui)
        builds.upcoming, run.scratch = run.upcoming, builds.scratch
        try:
            run.search()
        except KeyboardInterrupt:
            _interrupted(journal, report)
            raise
        except LeaseLost:
            pass  # below: aborted, with the reason
        finally:
            lab.settle()  # the last VM stops before anything ends (cleanup.py)
            journal.guard = None
            builds.close(remove=report.status not in ("interrupted", "running"))
            if keeper.lost and report.status == "running":
                report.status, report.message = "aborted", keeper.lost
            write_atomic(run_dir / "bisect.log", bisect.log())
            _finish(journal, report, hooks, ui)
            bisect.finish(spec.repo, remove=report.status not in ("interrupted", "running"))
            if not keeper.lost:  # the host is ours: put back what the target changed
                _restore_target(host, playbook, ui)


def _fleet(spec, state, hosts, playbook, run_dir, ui, me, lock, journal, report, hooks, build_ahead) -> None:
    """A search of its own (kary, bayes) over one executor per host (fleet.py)."""
    from .fleet import Fleet

    builds = Builds(spec.repo, playbook, run_dir, ui.detail)  # one cache, and builds ahead, for all hosts
    if build_ahead is None and builds.ahead is not None:
        build_ahead = builds.ahead.want
    fleet = Fleet(spec, state, hosts, playbook, run_dir, ui, journal, report, hooks, me["token"],
                  leased=functools.partial(leased, on_renewed=lock.heartbeat), build_ahead=build_ahead,
                  build=builds.build)
    try:
        fleet.run()
    except KeyboardInterrupt:
        _interrupted(journal, report)
        raise
    finally:
        builds.close(remove=report.status not in ("interrupted", "running"))
        lock.heartbeat()
        _finish(journal, report, hooks, ui)
        for h in hosts:
            if h.name not in fleet.aside:
                _restore_target(h, playbook, ui)


def _restore_target(host_cfg, playbook, ui: UI) -> None:
    """The target's restore() (a domain's saved XML, a box's default kernel); never raises."""
    target = targets.for_host(host_cfg, playbook)
    if type(target).restore is targets.Target.restore:
        return  # nothing to put back (a VM started per step)
    try:
        conn = target.connect(connect_host, Deadline.after(host_cfg.ssh.connect_timeout + 5))
    except (RemoteError, InfraError, RunAborted) as e:
        ui.warn(f"could not reach {host_cfg.name} to restore its {target.kind} target: {e}; "
                "`fleetbisect resume` of this run tries again")
        return
    try:
        done = target.restore(conn, Deadline.after(600))
        if done:
            ui.info(f"restored {host_cfg.name}: {done}")
    except Exception as e:  # noqa: BLE001 - reported; the run's answer stands
        ui.warn(f"could not restore the {target.kind} target on {host_cfg.name}: {e}")
    finally:
        conn.close()


@contextmanager
def leased(host_cfg, run_id: str, retries: int, ui: UI, token: str | None = None,
           on_renewed=None) -> Iterator[LeaseKeeper]:
    """Hold the host's lease for the whole run or step (renewed in the background), so two
    controllers never drive the same VM. A connection of its own: renewals never wait behind a
    step's command. Yields the keeper: `keeper.lost` / `keeper.check()` once a renewal failed."""
    for attempt in range(1, retries + 2):
        try:
            conn = connect_host(host_cfg, Deadline.after(host_cfg.ssh.connect_timeout + 5))
            break
        except RemoteError as e:
            if attempt > retries:
                raise RunAborted(f"cannot reach the host {host_cfg.name} ({attempt} attempts): {e}") from None
            ui.warn(f"cannot reach the host {host_cfg.name}: {e}; trying again in {RETRY_PAUSE:.0f}s")
            time.sleep(RETRY_PAUSE)
    lease = Lease.on(conn, host_cfg.work_dir, run_id, token=token)
    try:
        note = lease.acquire()
        if note:
            ui.warn(note)
        reboots = targets.select(host_cfg.target.kind).reboots_host  # a box: renewals reconnect
        keeper = LeaseKeeper(lease, lambda why: ui.error(f"{why}; stopping before the next decision"),
                             on_renewed, reconnect=(lambda: connect_host(
                                 host_cfg, Deadline.after(host_cfg.ssh.connect_timeout + 5))) if reboots else None).start()
        try:
            yield keeper
        finally:
            keeper.stop()
            try:
                lease.release()
            except Exception as e:  # noqa: BLE001 - it expires on its own
                ui.warn(f"could not release the lease on {host_cfg.name} (it expires by itself): {e}")
    finally:
        conn.close()
        if lease.host is not conn:  # the keeper reconnected (a box that rebooted)
            lease.host.close()


class _Run:
    """The phases of one run: endpoints, search, confirmation. Every decision is journaled
    before the next action, and a verdict the journal holds is reused, never retested."""

    def __init__(self, spec, state, lab, journal, report, bisect, hooks, ui):
        self.spec, self.state, self.lab = spec, state, lab
        self.journal, self.report, self.bisect, self.hooks, self.ui = journal, report, bisect, hooks, ui
        self.playbook = lab.playbook
        self.setup = SetupWatch()
        self.role = "bisect"  # of the step under way
        for rec in state.steps:
            self.setup.saw(StepRecord.from_json(rec))

    def search(self) -> None:
        report, spec = self.report, self.spec
        mark = None
        for commit, verdict in self.state.marks:  # git's bisect state, rebuilt from the journal
            mark = self.bisect.mark(Verdict(verdict), commit)
        if not self.state.marks and spec.check_endpoints and not self._endpoints_hold():
            return
        marked = {c for c, _ in self.state.marks}
        while not (mark and mark.done):
            commit = self.bisect.head()
            record = self._step(commit, "bisect")
            if record.verdict is Verdict.ABORT:
                report.status = "aborted"
                report.message = f"{commit[:12]} could not be tested: {record.reason}"
                return
            mistake = self.setup.mistake()
            if mistake:  # never skip the whole range for what is wrong with the setup
                report.status, report.message = "setup-error", mistake
                return
            if commit in marked:
                raise RuntimeError(f"bisect asked for {commit} again after it was marked")
            mark = self.bisect.mark(record.verdict, commit)
            marked.add(commit)
            self.journal.append("marked", commit=commit, verdict=record.verdict.value)
            self.ui.event("marked", commit=commit, verdict=record.verdict.value)
            write_atomic(report.run_dir / "bisect.log", self.bisect.log())
        if mark.culprit:
            report.status = "found"
            report.culprit = mark.culprit
            report.culprit_subject = subject(spec.repo, mark.culprit)
            report.culprit_author = git(spec.repo, "log", "-1", "--format=%an <%ae>", mark.culprit).stdout.strip()
            report.message = f"{mark.culprit} is the first bad commit: {report.culprit_subject}"
            if self.playbook.policy.confirm:
                self._confirm(mark.culprit)
        else:
            report.status = "inconclusive"
            report.candidates = list(mark.candidates)
            report.message = (
                f"only skipped commits are left; the first bad commit is one of "
                f"{len(mark.candidates)}: " + " ".join(c[:12] for c in mark.candidates)
            )

    def _endpoints_hold(self) -> bool:
        """The good end must test good and the bad end bad, or the search would mean nothing."""
        for commit, want, role in ((self.spec.good, Verdict.GOOD, "endpoint-good"),
                                   (self.spec.bad, Verdict.BAD, "endpoint-bad")):
            problem = endpoint_problem(self._step(commit, role), want, role)
            if problem:
                self.report.status, self.report.message = problem
                return False
        return True

    def _confirm(self, culprit: str) -> None:
        """Retest the culprit (bad) and its parent (good); the report says whether it held."""
        parent = git(self.spec.repo, "rev-parse", f"{culprit}^").stdout.strip()
        failed = []
        for _ in range(self.playbook.policy.confirm):
            for commit, want, role in ((culprit, Verdict.BAD, "confirm-culprit"),
                                       (parent, Verdict.GOOD, "confirm-parent")):
                record = self._step(commit, role, cached=False)
                if record.verdict is not want:
                    failed.append(f"{role.removeprefix('confirm-')} {commit[:12]} tested "
                                  f"{record.verdict.value} ({record.reason})")
        self.report.confirmed = not failed
        if failed:
            self.report.status = "unconfirmed"
            self.report.message = (
                f"the search pointed at {culprit} ({self.report.culprit_subject}), but it did NOT "
                "hold on retest: " + "; ".join(failed) + " (a flaky reproducer? raise policy.repeats)"
            )
            self.ui.warn("the culprit did not hold on retest: " + "; ".join(failed))
        else:
            self.ui.good(f"confirmed: {culprit[:12]} is bad and its parent {parent[:12]} good on retest")

    def upcoming(self, commit: str) -> list[str]:
        """What may be tested after `commit`, either verdict (stages/buildahead.py builds it)."""
        if self.role == "endpoint-good":
            return [self.spec.bad]
        if self.role == "endpoint-bad":
            return bisect_next(self.bisect.tree, self.scratch)
        if self.role == "confirm-culprit":
            return [git(self.spec.repo, "rev-parse", f"{commit}^").stdout.strip()]
        return bisect_upcoming(self.bisect.tree, commit, self.scratch) if self.role == "bisect" else []

    def _step(self, commit: str, role: str, *, cached: bool = True) -> StepRecord:
        self.role = role
        if cached:
            record = _decided(self.state, commit, self.ui)
            if record is not None:
                return record
        # git's bisect names the commit and leaves the tree alone (--no-checkout): the build
        # stage checks it out (Builds.build), once no build ahead uses the tree
        record = _test(self.lab, self.journal, self.report, commit, self.report.run_dir, self.spec.repo,
                       self.ui, self.bisect.remaining(), role)
        self.setup.saw(record)
        self.hooks.fire("verdict", commit=commit, verdict=record.verdict.value, reason=record.reason,
                        subject=record.subject, role=role)
        return record


def _decided(state: RunState, commit: str, ui: UI) -> StepRecord | None:
    """A verdict the journal already holds for this commit (same run, same playbook)."""
    rec = state.decided.get(commit)
    if rec is None or rec["verdict"] == Verdict.ABORT.value:
        return None
    ui.info(f"{commit[:12]} was already {rec['verdict']} in this run; not testing it again")
    return StepRecord.from_json(rec)


def _test(lab: Lab, journal: Journal, report: Report, commit: str, run_dir: Path, repo: Path,
          ui: UI, bisect_left: int, role: str = "bisect") -> StepRecord:
    index = len(report.steps) + 1
    subj = subject(repo, commit)
    what = "" if role == "bisect" else f" ({role})"
    ui.step(f"step {index}{what}: {commit[:12]} {subj}")
    journal.append("step-started", index=index, commit=commit, role=role)
    ui.event("step-started", index=index, commit=commit, subject=subj, left=bisect_left, role=role)
    record = run_step(lab, index, commit, subj, run_dir / "steps" / f"{index:03d}-{commit[:12]}", role)
    journal.append("step-finished", record=record.to_json())
    ui.event("step-finished", index=index, commit=commit, verdict=record.verdict.value,
             reason=record.reason, durations=record.durations)
    report.steps.append(record)
    report.write()
    shown = f"step {index}: {commit[:12]} is {record.verdict.value} ({record.reason})"
    (ui.good if record.verdict is Verdict.GOOD else ui.info)(shown)
    return record
