"""A whole bisect run: range, host, steps, culprit, report, in a run directory of its own.

Everything the run decides goes to the journal first (see journal.py), so `resume` can rebuild
the bisect from it: decided commits are replayed from the journal, never tested or marked
twice; a step the dead controller had started is tested again.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import RunAborted, UserError
from .files import write_atomic
from .journal import Journal, RunState, read, replay
from .report import Report
from .search.gitbisect import Bisect, git, resolve, subject
from .step import Lab, StepRecord, test_commit
from .ui import UI, log_to_file
from .verdict import Verdict


def controller() -> dict:
    """Who drives the run, so `status` can tell a running run from a dead one."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


@dataclass
class RunSpec:
    """What a run was started with; stored in the journal's first event."""

    run_id: str
    repo: Path
    good: str
    bad: str
    host: str
    inventory: list[Path]
    playbook: Path
    playbook_digest: str

    def to_json(self) -> dict:
        return {
            "run_id": self.run_id, "repo": str(self.repo), "good": self.good, "bad": self.bad,
            "host": self.host, "inventory": [str(p) for p in self.inventory],
            "playbook": str(self.playbook), "playbook_digest": self.playbook_digest,
        }

    @classmethod
    def from_json(cls, d: dict) -> "RunSpec":
        return cls(
            d["run_id"], Path(d["repo"]), d["good"], d["bad"], d["host"],
            [Path(p) for p in d["inventory"]], Path(d["playbook"]), d["playbook_digest"],
        )


def start_run(
    *, repo: Path, good: str, bad: str, host, inventory: list[Path], playbook,
    playbook_path: Path, run_dir: Path, ui: UI,
) -> Report:
    """Bisect `good..bad` of `repo` on `host` in a new run directory."""
    repo = repo.resolve()
    spec = RunSpec(
        uuid.uuid4().hex[:12], repo, resolve(repo, good), resolve(repo, bad), host.name,
        [p.resolve() for p in inventory], playbook_path.resolve(), playbook.digest,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "journal.jsonl").exists():
        raise UserError(f"{run_dir} already holds a run: `fleetbisect resume {run_dir}` continues it")
    Journal(run_dir).append("run-started", config=spec.to_json(), controller=controller())
    return _drive(spec, RunState(), host, playbook, run_dir, ui)


def resume_run(run_dir: Path, ui: UI) -> Report:
    """Continue a run whose controller died or was interrupted."""
    from .config.inventory import load_inventory
    from .config.playbook import load_playbook

    events, note = read(run_dir)
    if note:
        ui.warn(note)
    state = replay(events)
    if not state.config:
        raise UserError(f"{run_dir}: the journal has no run-started event")
    spec = RunSpec.from_json(state.config)
    host = load_inventory(spec.inventory).host(spec.host)
    playbook = load_playbook(spec.playbook)
    if playbook.digest != spec.playbook_digest:
        raise UserError(
            f"{spec.playbook} changed since the run started (digest {playbook.digest[:12]}, "
            f"was {spec.playbook_digest[:12]}): its verdicts would not mean the same; "
            "restore the playbook or start a new run"
        )
    if state.finished:
        ui.info(f"{run_dir}: the run had already finished ({state.finished.get('status')})")
    Journal(run_dir).append("resumed", decided=len(state.decided), marks=len(state.marks),
                            controller=controller())
    return _drive(spec, state, host, playbook, run_dir, ui)


def _drive(spec: RunSpec, state: RunState, host, playbook, run_dir: Path, ui: UI) -> Report:
    with log_to_file(run_dir / "run.log"):
        journal = Journal(run_dir)
        report = Report(
            run_dir, str(spec.repo), spec.good, spec.bad, spec.host, str(spec.playbook),
            spec.playbook_digest,
        )
        report.steps = [StepRecord.from_json(s) for s in state.steps]
        report.write()
        count = int(git(spec.repo, "rev-list", "--count", f"{spec.good}..{spec.bad}").stdout.strip() or 0)
        ui.step(
            f"bisecting {count} commits of {spec.repo} on {spec.host} (about "
            f"{max(1, math.ceil(math.log2(max(count, 2))))} steps); run directory {run_dir}"
        )
        ui.event("run-started", run_id=spec.run_id, host=spec.host, commits=count,
                 good=spec.good, bad=spec.bad, run_dir=str(run_dir))
        bisect = Bisect.create(spec.repo, run_dir / "worktree", spec.good, spec.bad)
        lab = Lab(bisect.tree, host, playbook, ui)
        started = time.monotonic()
        try:
            # Rebuild git's bisect state from the journal: each mark once, in its order.
            mark = None
            for commit, verdict in state.marks:
                mark = bisect.mark(Verdict(verdict), commit)
            marked = {c for c, _ in state.marks}
            while not (mark and mark.done):
                commit = bisect.head()
                record = _decided(state, commit, ui) or _test(
                    lab, journal, report, commit, run_dir, spec.repo, ui, bisect.remaining()
                )
                if record.verdict is Verdict.ABORT:
                    report.status = "aborted"
                    report.message = f"{commit[:12]} could not be tested: {record.reason}"
                    break
                if commit in marked:
                    raise RuntimeError(f"bisect asked for {commit} again after it was marked")
                mark = bisect.mark(record.verdict, commit)
                marked.add(commit)
                journal.append("marked", commit=commit, verdict=record.verdict.value)
                ui.event("marked", commit=commit, verdict=record.verdict.value)
                write_atomic(run_dir / "bisect.log", bisect.log())
            if mark and mark.culprit:
                report.status = "found"
                report.culprit = mark.culprit
                report.culprit_subject = subject(spec.repo, mark.culprit)
                report.message = f"{mark.culprit} is the first bad commit: {report.culprit_subject}"
            elif mark and mark.done:
                report.status = "inconclusive"
                report.candidates = list(mark.candidates)
                report.message = (
                    f"only skipped commits are left; the first bad commit is one of "
                    f"{len(mark.candidates)}: " + " ".join(c[:12] for c in mark.candidates)
                )
        except KeyboardInterrupt:
            report.status = "interrupted"
            report.message = f"interrupted; `fleetbisect resume {run_dir}` continues the run"
            journal.append("interrupted")
            raise
        finally:
            write_atomic(run_dir / "bisect.log", bisect.log())
            report.write()
            if report.status in ("found", "inconclusive", "aborted"):
                journal.append("run-finished", status=report.status, culprit=report.culprit,
                               message=report.message)
            ui.event("run-finished", status=report.status, culprit=report.culprit,
                     message=report.message)
            bisect.finish(spec.repo, remove=report.status in ("found", "inconclusive"))
            ui.detail(f"run took {time.monotonic() - started:.1f}s over {len(report.steps)} steps")
    if report.status == "aborted":
        raise RunAborted(report.message)
    return report


def _decided(state: RunState, commit: str, ui: UI) -> StepRecord | None:
    """A verdict the journal already holds for this commit (same run, same playbook)."""
    rec = state.decided.get(commit)
    if rec is None or rec["verdict"] == Verdict.ABORT.value:
        return None
    ui.info(f"{commit[:12]} was already {rec['verdict']} in this run; not testing it again")
    return StepRecord.from_json(rec)


def _test(lab: Lab, journal: Journal, report: Report, commit: str, run_dir: Path, repo: Path,
          ui: UI, bisect_left: int) -> StepRecord:
    index = len(report.steps) + 1
    subj = subject(repo, commit)
    ui.step(f"step {index}: {commit[:12]} {subj}")
    journal.append("step-started", index=index, commit=commit)
    ui.event("step-started", index=index, commit=commit, subject=subj, left=bisect_left)
    record = test_commit(lab, index, commit, subj, run_dir / "steps" / f"{index:03d}-{commit[:12]}")
    journal.append("step-finished", record=record.to_json())
    ui.event("step-finished", index=index, commit=commit, verdict=record.verdict.value,
             reason=record.reason, durations=record.durations)
    report.steps.append(record)
    report.write()
    shown = f"step {index}: {commit[:12]} is {record.verdict.value} ({record.reason})"
    (ui.good if record.verdict is Verdict.GOOD else ui.info)(shown)
    return record
