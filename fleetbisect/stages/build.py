"""Build stage: run the playbook's build command in a tree, locally. Failure is a skip.

The command is the playbook's own shell snippet (trusted config, like a Makefile); data such as
the commit id reaches it only through the environment (LOCALVERSION), never pasted in.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..deadline import Deadline
from ..localexec import kill_orphan, run_logged
from .. import masking
from ..masking import open_masked
from ..search.gitbisect import git
from ..verdict import OutcomeKind
from . import distcc


@dataclass(frozen=True)
class BuildResult:
    ok: bool
    summary: str
    log: Path
    seconds: float
    release: str | None = None  # the kernel release the build stamped, if the tree says
    artifacts: dict[str, Path] = field(default_factory=dict)
    disk_full: bool = False  # it failed for want of space: no verdict about the commit at all
    kind: OutcomeKind = OutcomeKind.BUILD_FAILED  # what a failure says: failed, timeout, setup


def localversion(commit: str) -> str:
    return f"-fb{commit[:12]}"


PIDFILE = "build.pid"


def build(tree: Path, playbook, commit: str, log_path: Path, deadline: Deadline,
          pidfile: Path | None = None, on=None) -> BuildResult:
    """Apply cherry-picks, run the build command, collect artifacts, undo the cherry-picks.

    The log is masked as it streams. `pidfile` (default: build.pid next to the log) names the
    running build's process group; a build a dead controller left there is killed first.
    `on`: the machine to build on (an inventory BuildHost), instead of here."""
    if on is not None:
        from .remotebuild import build_on

        return build_on(on, tree, playbook, commit, log_path, deadline)
    spec = playbook.build
    pidfile = log_path.with_name(PIDFILE) if pidfile is None else pidfile
    env = dict(os.environ)
    env.update({k: str(v) for k, v in spec.env.items()})
    if spec.distcc:
        env = distcc.local_environment(spec.distcc, env)
    masking.register(env)  # secret-looking names in the environment it inherits
    masking.register_build_env(spec.env)
    if spec.localversion:
        env["LOCALVERSION"] = localversion(commit)
    started = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    kill_orphan(pidfile)
    with open_masked(log_path, "wb") as log:
        try:
            for pick in spec.cherry_picks:
                status = run_logged(
                    ["git", "cherry-pick", "--no-commit", pick], tree, env, log, deadline, pidfile
                )
                if status != 0:
                    return BuildResult(
                        False, f"cherry-pick {pick} does not apply", log_path,
                        time.monotonic() - started,
                    )
            status = run_logged(["bash", "-c", spec.command], tree, env, log, deadline, pidfile)
        finally:
            if spec.cherry_picks:
                git(tree, "reset", "--hard", "--quiet", commit)
    seconds = time.monotonic() - started
    if status is None:
        return BuildResult(False, f"build timed out after {spec.timeout:.0f}s (build.timeout)", log_path,
                           seconds, kind=OutcomeKind.BUILD_TIMEOUT)
    if status != 0:
        if _disk_full(log_path):
            return BuildResult(False, f"the build ran out of disk space in {tree} (exit {status})",
                               log_path, seconds, disk_full=True)
        return BuildResult(False, f"build failed (exit {status})", log_path, seconds)

    artifacts: dict[str, Path] = {}
    missing = []
    for name, rel in playbook.artifacts.items():
        path = tree / rel
        (artifacts.__setitem__(name, path) if path.is_file() else missing.append(f"{name}={rel}"))
    if missing:
        return BuildResult(
            False, "build produced no " + ", ".join(missing), log_path, seconds
        )
    release = None
    if spec.release_file:
        rf = tree / spec.release_file
        if rf.is_file():
            release = rf.read_text().strip() or None
    if spec.localversion and (release is None or not release.endswith(localversion(commit))):
        # The build did not stamp this commit into the kernel: a build command that ignores
        # LOCALVERSION, or stale artifacts. No step could prove its kernel: a setup mistake.
        return BuildResult(
            False,
            f"the build did not stamp {localversion(commit)} into the kernel release "
            f"({spec.release_file}: {release!r}): does build.command pass LOCALVERSION to make, "
            "or leave stale artifacts? (or set build.localversion: false, and the running kernel "
            "is checked by its release only)",
            log_path, seconds, kind=OutcomeKind.SETUP_ERROR,
        )
    return BuildResult(True, "built", log_path, seconds, release, artifacts)


def kill_orphan_build(run_dir: Path) -> list[int]:
    """Kill the builds a dead controller left running in a run directory (its steps' pid
    files); called when the run resumes. Returns the pids signalled."""
    killed = []
    for pidfile in [run_dir / PIDFILE, *sorted(run_dir.glob(f"steps/*/{PIDFILE}"))]:
        killed += kill_orphan(pidfile)
    return killed


def _disk_full(log_path: Path) -> bool:
    with open(log_path, "rb") as f:
        f.seek(max(0, log_path.stat().st_size - 65536))
        tail = f.read()
    return b"No space left on device" in tail or b"Disk quota exceeded" in tail


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()
