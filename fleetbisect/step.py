"""One step: a commit tested once end to end, as data flowing through the stages.

    commit ─build─▶ artifacts ─push─▶ host ─boot─▶ VM ─ready─▶ guest ─reproduce─▶ outcomes ─▶ verdict

Build happens once per step; push…reproduce is an *attempt*, repeated when an infrastructure
fault hit it (bounded by the playbook's retries), and cleanup (stop the VM, fetch the console)
always runs, on errors and on Ctrl-C too.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cleanup import Pending
from .deadline import Deadline
from .errors import InfraError
from .files import write_json_atomic, write_text_masked
from .lease import LeaseLost
from .masking import mask_file
from .remote.base import CommandTimedOut, Remote, RemoteError, TunnelRefused
from .remote.ssh import SSHRemote
from .reproducers import ReproContext, guest_lost, host_generation, preflight
from .reproducers import run as run_reproducer
from .stages import judge
from . import targets
from .targets import TargetStartFailed
from .stages.build import BuildResult, build
from .stages.push import HashCache, push
from .stages.ready import BootFailed, verify_kernel, wait_ready
from .ui import UI
from .verdict import Decision, Outcome, OutcomeKind, Verdict, decide

log = logging.getLogger("fleetbisect.step")

RETRY_PAUSE = 5.0  # seconds between attempts after an infrastructure fault


@dataclass
class StepRecord:
    index: int
    commit: str
    subject: str
    verdict: Verdict
    reason: str
    outcomes: list[Outcome] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)  # relative to the run directory
    attempts: int = 0
    release: str | None = None
    pushed: dict[str, int] = field(default_factory=dict)  # artifact -> bytes sent (last attempt)
    role: str = "bisect"  # bisect | endpoint-good | endpoint-bad | confirm-culprit | confirm-parent
    build: dict = field(default_factory=dict)  # cached_from, ccache hit rate, same_image_as (stages/build.py)

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "commit": self.commit,
            "subject": self.subject,
            "verdict": self.verdict.value,
            "reason": self.reason,
            "outcomes": [o.to_json() for o in self.outcomes],
            "durations": {k: round(v, 3) for k, v in self.durations.items()},
            "evidence": self.evidence,
            "attempts": self.attempts,
            "release": self.release,
            "pushed": self.pushed,
            "role": self.role,
            "build": self.build,
        }

    @classmethod
    def from_json(cls, d: dict) -> "StepRecord":
        return cls(
            d["index"], d["commit"], d["subject"], Verdict(d["verdict"]), d["reason"],
            [Outcome.from_json(o) for o in d["outcomes"]], dict(d["durations"]),
            list(d["evidence"]), d["attempts"], d.get("release"), dict(d.get("pushed", {})),
            d.get("role", "bisect"), dict(d.get("build", {})),
        )


@dataclass
class Lab:
    """What a step needs besides the commit: where it builds and which host it drives."""

    tree: Path
    host: object  # config.inventory.HostConfig
    playbook: object  # config.playbook.Playbook
    ui: UI
    hashes: HashCache = field(default_factory=HashCache)
    lease: object = None  # lease.LeaseKeeper of the host; every stage starts only while it is held
    # How the host is reached and what boots the kernel on it (fakes in unit tests).
    connect: Callable[..., Remote] = field(default=lambda cfg, deadline: connect_host(cfg, deadline))
    make_target: Callable[..., object] = field(default=lambda cfg, playbook: targets.for_host(cfg, playbook))
    build: Callable[..., BuildResult] = field(default=build)  # a run's: with its cache, ahead (stages/buildahead.py)
    # Stop a finished attempt's VM in the background while the run goes on (cleanup.py); whoever
    # sets this must call settle() when the run ends, however it ends (run.py does).
    background_cleanup: bool = False
    pending: Pending | None = field(default=None, repr=False)

    def settle(self) -> bool:
        """Wait for the previous attempt's VM to be stopped (before the next boot on this host,
        before the lease is given back, when the run ends); what went wrong is a warning.
        True when a previous attempt's stop finished cleanly: nothing of ours runs there now."""
        pending, self.pending = self.pending, None
        if pending is None:
            return False
        error, waited = pending.wait()
        if error:
            self.ui.warn(f"could not clean up after the previous step: {error}")
        elif waited > 0.05:
            self.ui.detail(f"waited {waited:.2f}s for the previous VM to stop")
        return error is None

    def check_lease(self) -> None:
        """Raise LeaseLost when the host's lease was lost: the VM may be someone else's now."""
        if self.lease is not None:
            self.lease.check()

    @property
    def lease_lost(self) -> bool:
        return bool(self.lease is not None and self.lease.lost)


class _Timer:
    """`with timed("boot", budget):` adds the stage's time to `durations` and tells the UI."""

    def __init__(self, durations: dict[str, float], ui: UI, check=lambda: None):
        self.durations = durations
        self.ui = ui
        self.check = check  # raises when the step must not go on (the host's lease was lost)

    @contextmanager
    def __call__(self, stage: str, budget: float | None = None):
        if stage != "cleanup":
            self.check()
        t = time.monotonic()
        self.ui.event("stage-started", stage=stage, budget=budget)
        try:
            yield
        finally:
            took = time.monotonic() - t
            self.durations[stage] = self.durations.get(stage, 0.0) + took
            self.ui.event("stage-finished", stage=stage, seconds=round(took, 3))


def run_step(lab: Lab, index: int, commit: str, subject: str, step_dir: Path,
                role: str = "bisect") -> StepRecord:
    """Build `commit` (already checked out in lab.tree) and test it; never raises for faults
    that a verdict can express (skip, abort)."""
    playbook = lab.playbook
    step_dir.mkdir(parents=True, exist_ok=True)
    durations: dict[str, float] = {}
    timed = _Timer(durations, lab.ui, lab.check_lease)
    rel = lambda name: str((step_dir / name).relative_to(step_dir.parent.parent))  # noqa: E731

    lab.ui.info(f"building {commit[:12]}")
    with timed("build", playbook.build.timeout):
        built = lab.build(lab.tree, playbook, commit, step_dir / "build.log", Deadline.after(playbook.build.timeout),
                          on=getattr(lab.host, "builder", None))
    for note in built.notes:
        lab.ui.detail(note)
    evidence = [rel("build.log")]
    if not built.ok:
        if built.disk_full:  # not the commit's fault, and it will not heal by itself: stop
            outcome = Outcome(OutcomeKind.INFRA_ERROR, built.summary, {}, ("build.log",))
            decision = Decision(Verdict.ABORT, f"infra-error: {built.summary}; free some space")
        else:
            outcome = Outcome(built.kind, built.summary, {}, ("build.log",))
            decision = decide([outcome], playbook.policy_map())
        return _finish(step_dir, StepRecord(
            index, commit, subject, decision.verdict, decision.reason, [outcome], durations,
            evidence, 0, None, role=role, build=built.info,
        ))

    attempt = 0
    while True:
        attempt += 1
        pushed: dict[str, int] = {}
        for stale in step_dir.glob("*.log"):  # a retried attempt's evidence is its own
            if stale.name != "build.log":
                stale.unlink()
        outcomes = _silent_boots(_attempt(lab, built, step_dir, timed, pushed), step_dir / "console.log")
        # The console was fetched whatever happened: what the kernel said explains the outcome.
        outcomes = judge.explain(outcomes, judge.console_findings(step_dir / "console.log"))
        outcomes = judge.apply_signature(outcomes, playbook.signature, playbook.policy_map())
        decision: Decision = decide(
            outcomes, playbook.policy_map(), attempt=attempt, retries=playbook.policy.retries
        )
        if decision.verdict is not None:
            break
        lab.ui.warn(f"{commit[:12]}: {decision.reason}; trying again in {RETRY_PAUSE:.0f}s")
        time.sleep(RETRY_PAUSE)
    for path in sorted(step_dir.glob("*.log")):
        if path.name != "build.log":
            evidence.append(rel(path.name))
    if (step_dir / "commands.txt").exists():
        evidence.append(rel("commands.txt"))
    return _finish(step_dir, StepRecord(
        index, commit, subject, decision.verdict, decision.reason, outcomes, durations,
        evidence, attempt, built.release, pushed, role, built.info,
    ))


def _silent_boots(outcomes: list[Outcome], console: Path) -> list[Outcome]:
    """A boot that failed without a single byte on the console: the kernel may never have
    started (a QEMU or boot setup mistake), which the run tells apart from a broken commit."""
    try:
        silent = console.stat().st_size == 0
    except OSError:
        silent = True
    if not silent:
        return outcomes
    return [Outcome(o.kind, f"{o.summary} (no console output at all)", {**o.details, "console_silent": True},
                    o.evidence) if o.kind is OutcomeKind.BOOT_FAILED else o for o in outcomes]


def _finish(step_dir: Path, record: StepRecord) -> StepRecord:
    write_json_atomic(step_dir / "result.json", record.to_json())
    return record


def connect_host(host_cfg, deadline: Deadline) -> SSHRemote:
    return SSHRemote.connect(host_cfg.ssh_params(), deadline=deadline)


def _attempt(lab: Lab, built: BuildResult, step_dir: Path, timed, pushed: dict[str, int]) -> list[Outcome]:
    """push → boot → ready → verify → reproduce, with cleanup always. Faults become outcomes.

    The target is driven through its interface only (targets/base.py). `pushed` receives the
    bytes sent per artifact (nothing for an unchanged one)."""
    host_cfg, playbook = lab.host, lab.playbook
    target = lab.make_target(host_cfg, playbook)
    target.expect(built.release)
    with ExitStack() as stack:
        try:
            host = target.connect(lab.connect, Deadline.after(host_cfg.ssh.connect_timeout + 5))
        except InfraError as e:  # unreachable, or a box not brought back (one needing a human: RunAborted)
            return [Outcome(OutcomeKind.INFRA_ERROR, f"cannot reach the host: {e}")]
        stack.callback(_cleanup, lab, target, host, step_dir, timed)
        try:
            with timed("push", playbook.push_timeout):
                result = push(host, host_cfg.work_dir, built.artifacts, Deadline.after(playbook.push_timeout),
                              lab.hashes, image_send=playbook.image.send)
            pushed.update(result.uploaded)
            lab.ui.detail(f"pushed {sum(result.uploaded.values())} bytes ({', '.join(result.uploaded) or 'nothing changed'})")
            with timed("boot"):
                # the previous attempt's VM (stopping in the background while this one built and
                # pushed); without one that stopped cleanly, any VM left on the host (a dead
                # controller's: the lease is ours, so nobody else started one since)
                if not lab.settle():
                    stopped = target.stop(host, Deadline.after(60))
                    if stopped:
                        lab.ui.detail(f"previous VM: {stopped}")
                target.deploy(host, result.remote_paths, step_dir, Deadline.after(playbook.push_timeout))
                try:
                    target.start(host, result.remote_paths, step_dir, Deadline.after(60))
                except TargetStartFailed as e:
                    return [Outcome(OutcomeKind.INFRA_ERROR, str(e))]
            vm_started = time.monotonic()
            if playbook.console_only:  # init is the reproducer: the console is all there is
                with timed("reproduce"):
                    ctx = ReproContext(None, host, step_dir, lab.ui.detail, target=target,
                                       vm_started=vm_started, release=built.release)
                    return run_reproducer(playbook.reproducers[0], ctx)
            with timed("ready", playbook.boot.timeout):
                try:
                    guest, waited = wait_ready(
                        lambda d: target.alive(host, d), lambda: target.probe(host),
                        lambda d: target.login(host, d), Deadline.after(playbook.boot.timeout),
                        reached_by=target.reached_by,
                    )
                except BootFailed as e:
                    return [Outcome(OutcomeKind.BOOT_FAILED, e.summary, {}, ("console.log",))]
                except TunnelRefused as e:
                    return [Outcome(OutcomeKind.SETUP_ERROR, f"cannot reach the guest through the host: {e}")]
                generation = host_generation(host)
                stack.callback(guest.close)
                wrong = verify_kernel(guest, playbook.verify.command, built.release, Deadline.after(30))
                if wrong:
                    return [wrong]
            with timed("reproduce"):
                outcomes = reproduce(playbook, ReproContext(guest, host, step_dir, lab.ui.detail, target=target,
                                                            vm_started=vm_started, release=built.release,
                                                            host_generation=generation))
            if all(o.kind in (OutcomeKind.PASS, OutcomeKind.FAIL) for o in outcomes):
                _save_dmesg(guest, step_dir, lab.ui)  # the guest still answers: keep its kernel log
            return outcomes
        except LeaseLost:
            raise  # not this step's fault and not to be retried: the run stops (resumable)
        except InfraError as e:
            return [Outcome(OutcomeKind.INFRA_ERROR, str(e))]


def reproduce(playbook, ctx: ReproContext) -> list[Outcome]:
    """Every reproducer in order, `policy.repeats` times, stopping at the first run that is not
    a pass (a flaky bug that showed once has shown). Every run's outcome is kept."""
    specs = playbook.reproducers
    runs = playbook.policy.repeats
    outcomes: list[Outcome] = []
    for run in range(1, runs + 1):
        for i, spec in enumerate(specs, 1):
            parts = ([f"run{run}"] if runs > 1 else []) + ([f"{i}-{spec.kind}"] if len(specs) > 1 else [])
            ctx.log_name = "reproducer" + "".join(f"-{p}" for p in parts) + ".log"
            if run == 1:
                unusable = _preflight(spec, ctx)
                if unusable:
                    return outcomes + [unusable]
            got = run_reproducer(spec, ctx)
            outcomes += got
            if any(o.kind is not OutcomeKind.PASS for o in got):
                return outcomes
    return outcomes


def _preflight(spec, ctx: ReproContext) -> Outcome | None:
    """A reproducer that cannot work in this guest is a setup error, never a verdict (checked
    just before it runs: an earlier reproducer may prepare what it needs)."""
    try:
        problem = preflight(spec, ctx.guest, Deadline.after(30)) if ctx.guest is not None else None
    except CommandTimedOut:
        return guest_lost(ctx, f"the {spec.kind} preflight got no answer from the guest", OutcomeKind.HANG, {})
    except RemoteError as e:
        return guest_lost(ctx, f"the {spec.kind} preflight lost the guest: {e}", OutcomeKind.FAIL, {})
    if problem:
        return Outcome(OutcomeKind.SETUP_ERROR, f"the {spec.kind} reproducer cannot work in this guest: {problem}")
    return None


def _save_dmesg(guest: Remote, step_dir: Path, ui: UI) -> None:
    try:
        res = guest.run(["dmesg"], deadline=Deadline.after(15))
    except RemoteError as e:
        ui.detail(f"no dmesg: {e}")
        return
    if res.ok:
        write_text_masked(step_dir / "dmesg.log", res.stdout)


def _cleanup(lab: Lab, target, host: Remote, step_dir: Path, timed) -> None:
    """Stop the VM, fetch its console and close the host connection. Runs on every exit path;
    never raises. A controller that lost the host's lease leaves the VM alone: it may be
    another controller's by now. With `lab.background_cleanup` the console is fetched first
    (the step is judged on it) and the stop runs while the run goes on (cleanup.py)."""
    ui = lab.ui

    def stop() -> None:
        if lab.lease_lost:
            ui.warn("the host's lease was lost: leaving the VM to whoever holds it now")
        else:
            target.stop(host, Deadline.after(60))

    def fetch() -> None:
        try:
            target.fetch_console(host, step_dir / "console.log", Deadline.after(60))
            mask_file(step_dir / "console.log")
        except Exception as e:  # noqa: BLE001
            ui.detail(f"no console log: {e}")

    def stop_and_close() -> None:
        try:
            stop()
        finally:
            host.close()

    with timed("cleanup"):
        # not for a target that reboots the host itself (a box): the next step reaches it only
        # once it is back on its default kernel
        if lab.background_cleanup and not lab.lease_lost and not getattr(target, "reboots_host", False):
            fetch()
            lab.pending = Pending(stop_and_close, "stopping the VM")
            return
        try:
            stop()
        except Exception as e:  # noqa: BLE001 - cleanup reports, it does not mask the real error
            ui.warn(f"could not stop the VM: {e}")
        fetch()
        host.close()
