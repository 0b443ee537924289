"""A whole bisect run: range, host, steps, culprit, report, in a run directory of its own."""

from __future__ import annotations

import math
import time
from pathlib import Path

from .errors import RunAborted
from .files import write_atomic
from .report import Report
from .search.gitbisect import Bisect, git, resolve, subject
from .step import Lab, test_commit
from .ui import UI, log_to_file
from .verdict import Verdict


def run_bisect(
    *,
    repo: Path,
    good: str,
    bad: str,
    host,
    playbook,
    playbook_path: Path,
    run_dir: Path,
    ui: UI,
) -> Report:
    """Bisect `good..bad` of `repo` on `host`. Returns the final report (status says how it
    ended); raises RunAborted when the run could not finish, after writing the report."""
    repo = repo.resolve()
    good_sha, bad_sha = resolve(repo, good), resolve(repo, bad)
    run_dir.mkdir(parents=True, exist_ok=True)
    with log_to_file(run_dir / "run.log"):
        return _run(repo, good_sha, bad_sha, host, playbook, playbook_path, run_dir, ui)


def _run(repo, good_sha, bad_sha, host, playbook, playbook_path, run_dir, ui) -> Report:
    report = Report(
        run_dir, str(repo), good_sha, bad_sha, host.name, str(playbook_path), playbook.digest
    )
    report.write()
    count = int(git(repo, "rev-list", "--count", f"{good_sha}..{bad_sha}").stdout.strip() or 0)
    ui.step(
        f"bisecting {count} commits of {repo} on {host.name} "
        f"(about {max(1, math.ceil(math.log2(max(count, 2))))} steps); run directory {run_dir}"
    )
    bisect = Bisect.create(repo, run_dir / "worktree", good_sha, bad_sha)
    lab = Lab(bisect.tree, host, playbook, ui)
    started = time.monotonic()
    try:
        index = 0
        while True:
            index += 1
            commit = bisect.head()
            subj = subject(repo, commit)
            ui.step(f"step {index}: {commit[:12]} {subj}")
            record = test_commit(lab, index, commit, subj, run_dir / "steps" / f"{index:03d}-{commit[:12]}")
            report.steps.append(record)
            report.write()
            shown = f"step {index}: {commit[:12]} is {record.verdict.value} ({record.reason})"
            (ui.good if record.verdict is Verdict.GOOD else ui.info)(shown)
            if record.verdict is Verdict.ABORT:
                report.status = "aborted"
                report.message = f"step {index} ({commit[:12]}) could not be tested: {record.reason}"
                break
            mark = bisect.mark(record.verdict, commit)
            if mark.culprit:
                report.status = "found"
                report.culprit = mark.culprit
                report.culprit_subject = subject(repo, mark.culprit)
                report.message = f"{mark.culprit} is the first bad commit: {report.culprit_subject}"
                break
            if mark.done:
                report.status = "inconclusive"
                report.candidates = list(mark.candidates)
                report.message = (
                    f"only skipped commits are left; the first bad commit is one of "
                    f"{len(mark.candidates)}: " + " ".join(c[:12] for c in mark.candidates)
                )
                break
            ui.detail(f"about {bisect.remaining()} commits left")
    except KeyboardInterrupt:
        report.status = "interrupted"
        report.message = "interrupted by the user; the current step was not marked"
        raise
    finally:
        write_atomic(run_dir / "bisect.log", bisect.log())
        report.write()
        bisect.finish(repo, remove=report.status in ("found", "inconclusive"))
        ui.detail(f"run took {time.monotonic() - started:.1f}s over {len(report.steps)} steps")
    if report.status == "aborted":
        raise RunAborted(report.message)
    return report
