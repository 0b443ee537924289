"""Build ahead: while a host tests commit k, build what the search may ask for next.

    builds = Builds(repo, playbook, run_dir, ui)     # the run's build cache, and its builds ahead
    lab = Lab(..., build=builds.build)               # a step builds through it
    builds.upcoming = lambda commit: [...]           # what may come after `commit`, either verdict
    ...
    builds.close()                                   # stops builds ahead, keeps nothing running

`Builds.build` is the build stage with the run's cache (stages/buildcache.py): a commit built
ahead is a cache hit, one still building ahead is waited for (never built twice at once), and
once the step's own artifacts are there, the commits `upcoming(commit)` names are handed to
`BuildAhead.want`. For git's bisect that is the next commit if k is good and the next if k is
bad (`bisect_upcoming`); for the searches of search/, `Search.upcoming()`.

`BuildAhead` runs `build.ahead` builds at once, each in a worktree of its own under
RUN_DIR/ahead/ (kept for the run: its next build there is incremental too), and starts one only
while the disk holding them has `build.ahead_min_free` free. `want(commits)` replaces what is
wanted: a build ahead of a commit no longer wanted is stopped, and so is every other one when
the step needs a commit nobody built (`get`), so that the build the host waits for has the
cores. A build ahead that fails is not kept: the step builds the commit itself, with its log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..deadline import Deadline
from ..localexec import kill_orphan
from ..search.gitbisect import git
from .build import PIDFILE, BuildResult, build
from .buildcache import BuildCache


@dataclass
class _Slot:
    tree: Path
    commit: str | None = None  # building now
    cancelled: bool = False

    @property
    def pidfile(self) -> Path:
        return self.tree.parent / f"{self.tree.name}.{PIDFILE}"


class BuildAhead:
    def __init__(self, repo: Path, playbook, base: Path, cache: BuildCache, log=lambda msg: None,
                 seed: Path | None = None):
        self.repo, self.playbook, self.base, self.cache, self.log = repo, playbook, base, cache, log
        self.seed = seed  # a built tree a new worktree starts from (the run's): no full first build
        self.seed_lock = threading.Lock()  # held while the seed tree builds, or is copied
        self.slots = [_Slot(base / f"tree{i}") for i in range(playbook.build.ahead)]
        self.wanted: list[str] = []
        self.built: dict[str, BuildResult] = {}  # commit -> a build ahead that finished
        self.cond = threading.Condition()
        self.closed = False
        self.threads = [threading.Thread(target=self._work, args=(s,), name=f"build-ahead-{i}", daemon=True)
                        for i, s in enumerate(self.slots)]
        for t in self.threads:
            t.start()

    # -- the API -------------------------------------------------------------------------------
    def want(self, commits: list[str]) -> None:
        """Build these (in this order) ahead; a build ahead of anything else is stopped."""
        with self.cond:
            self.wanted = [c for c in dict.fromkeys(commits) if c not in self.built]
            for slot in self.slots:
                if slot.commit and slot.commit not in self.wanted:
                    self._cancel(slot)
            self.cond.notify_all()

    def get(self, commit: str, deadline: Deadline) -> BuildResult | None:
        """The build ahead of `commit` once it is done (waiting for one under way), or None when
        it was not built ahead. The other builds ahead are stopped: the step needs the cores."""
        with self.cond:
            self.wanted = []
            for slot in self.slots:
                if slot.commit and slot.commit != commit:
                    self._cancel(slot)
            # ... and waited for, so the cores are free (a cancel that came between two commands
            # of a build misses the second: killed again until the slot is idle)
            while any(s.commit and (s.commit == commit or s.cancelled) for s in self.slots) and not deadline.expired:
                self.cond.wait(min(0.2, max(0.01, deadline.remaining())))
                for slot in self.slots:
                    if slot.commit and slot.cancelled:
                        kill_orphan(slot.pidfile)
            return self.built.get(commit)

    def settle(self, deadline: Deadline) -> bool:
        """Wait until everything wanted was built (or given up); False at the deadline."""
        with self.cond:
            while (self.wanted or any(s.commit for s in self.slots)) and not deadline.expired:
                self.cond.wait(min(1.0, max(0.01, deadline.remaining())))
            return not (self.wanted or any(s.commit for s in self.slots))

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.wanted = []
            for slot in self.slots:
                if slot.commit:
                    self._cancel(slot)
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout=60)

    # -- the workers ---------------------------------------------------------------------------
    def _cancel(self, slot: _Slot) -> None:
        slot.cancelled = True
        kill_orphan(slot.pidfile)  # the build's own process group, which we started

    def _next(self, slot: _Slot) -> str | None:
        with self.cond:
            while not self.closed:
                busy = {s.commit for s in self.slots}
                todo = [c for c in self.wanted if c not in busy and c not in self.built]
                if todo and self._room():
                    slot.commit, slot.cancelled = todo[0], False
                    self.wanted.remove(todo[0])
                    return todo[0]
                self.cond.wait(5.0)
            return None

    def _room(self) -> bool:
        self.base.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.base).free
        if free < self.playbook.build.ahead_min_free:
            self.log(f"not building ahead: {free >> 20} MiB free in {self.base}, "
                     f"build.ahead_min_free is {self.playbook.build.ahead_min_free >> 20} MiB")
            return False
        return True

    def _work(self, slot: _Slot) -> None:
        while (commit := self._next(slot)) is not None:
            result = None
            try:
                if not (slot.tree / ".git").exists():
                    self._add(slot.tree, commit)
                git(slot.tree, "checkout", "--quiet", "--force", "--detach", commit)
                if not slot.cancelled:
                    started = time.monotonic()
                    result = build(slot.tree, self.playbook, commit, self.base / "logs" / f"{commit[:12]}.log",
                                   Deadline.after(self.playbook.build.timeout), slot.pidfile, self.cache)
                    if result.ok and not slot.cancelled:
                        self.log(f"built {commit[:12]} ahead in {time.monotonic() - started:.0f}s")
            except Exception as e:  # noqa: BLE001 - a build ahead is a guess: the step builds it itself
                self.log(f"building {commit[:12]} ahead failed: {e}")
            with self.cond:
                if result is not None and result.ok and not slot.cancelled:
                    self.built[commit] = result
                slot.commit = None
                self.cond.notify_all()

    def _add(self, tree: Path, commit: str) -> None:
        """A worktree of its own at `commit`. Started from a copy of the run's built tree when
        there is one (timestamps kept): only the files that differ are rewritten, so its first
        build is incremental, as in the run's tree."""
        if self.seed is None or not (self.seed / ".git").exists():
            git(self.repo, "worktree", "add", "--detach", "--force", str(tree), commit)
            return
        started = time.monotonic()
        git(self.repo, "worktree", "add", "--detach", "--force", "--no-checkout", str(tree), commit)
        with self.seed_lock:  # never a copy of a half-written object file
            entries = [str(p) for p in self.seed.iterdir() if p.name != ".git"]
            proc = subprocess.run(["cp", "-a", "--reflink=auto", *entries, str(tree)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise OSError(f"cannot copy {self.seed} to {tree}: {proc.stderr.strip()[-300:]}")
        _relocate(tree, self.seed)
        git(tree, "reset", "--quiet")  # the index of `commit`
        git(tree, "update-index", "--quiet", "--refresh", check=False)  # files that differ stay dirty
        git(tree, "reset", "--quiet", "--hard")  # ... and only those are rewritten
        self.log(f"build-ahead worktree {tree.name} copied from {self.seed.name} in {time.monotonic() - started:.0f}s")

    def remove(self) -> None:
        for slot in self.slots:
            if (slot.tree / ".git").exists():
                git(self.repo, "worktree", "remove", "--force", str(slot.tree), check=False)


class Builds:
    """The build stage as a run uses it: its cache, and its builds ahead (build.ahead > 0)."""

    def __init__(self, repo: Path, playbook, run_dir: Path, log=lambda msg: None, seed: Path | None = None):
        self.cache = BuildCache.for_playbook(playbook, run_dir / "build-cache")
        self.ahead = (BuildAhead(repo, playbook, run_dir / "ahead", self.cache, log, seed)
                      if playbook.build.ahead and self.cache else None)
        self.upcoming: Callable[[str], list[str]] | None = None
        self.log, self.repo, self.base = log, repo, run_dir / "ahead"

    def build(self, tree: Path, playbook, commit: str, log_path: Path, deadline: Deadline, on=None) -> BuildResult:
        if on is not None:  # a build host (stages/remotebuild.py) builds it: not built ahead here
            return build(tree, playbook, commit, log_path, deadline, on=on)
        if self.ahead is not None:
            self.ahead.get(commit, deadline)  # a build ahead under way is waited for, not repeated
            # the seed tree is copied for builds ahead: not while it builds (a fleet has no seed,
            # and its hosts build side by side)
            with self.ahead.seed_lock if self.ahead.seed is not None else contextlib.nullcontext():
                result = build(tree, playbook, commit, log_path, deadline, cache=self.cache)
        else:
            result = build(tree, playbook, commit, log_path, deadline, cache=self.cache)
        if self.ahead is not None and self.upcoming is not None:
            try:
                self.ahead.want(self.upcoming(commit))
            except Exception as e:  # noqa: BLE001 - a wrong guess costs a build, never the step
                self.log(f"cannot tell what to build ahead: {e}")
        return result

    @property
    def scratch(self) -> Path:
        """Where git is asked what its bisect would do next (bisect_upcoming)."""
        return self.base / "bisect"

    def close(self, remove: bool = True) -> None:
        if self.ahead is not None:
            self.ahead.close()
            if remove:
                self.ahead.remove()
        if remove and (self.scratch / ".git").exists():
            git(self.repo, "worktree", "remove", "--force", str(self.scratch), check=False)


def _relocate(tree: Path, seed: Path) -> None:
    """Build records that name the tree they were made in (the kernel's tools/objtool keeps
    absolute paths in its .cmd and .d files) are made to name the copy, their times kept:
    else the copy rebuilds objtool, and every object after it."""
    proc = subprocess.run(["grep", "-rlF", "--include=.*.cmd", "--include=*.d", str(seed), str(tree)],
                          capture_output=True)
    for name in proc.stdout.decode(errors="surrogateescape").splitlines():
        path = Path(name)
        st = path.stat()
        path.write_bytes(path.read_bytes().replace(str(seed).encode(), str(tree).encode()))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def bisect_upcoming(tree: Path, commit: str, scratch: Path) -> list[str]:
    """What git's bisect (in `tree`) will ask for after `commit` is marked bad, then good.
    Asked of git itself, in `scratch`: a worktree with no files, where a bisect started with
    --no-checkout replays the run's marks plus the one supposed."""
    bad, goods, skipped = _bisect_refs(tree)
    if bad is None or not goods:
        return []
    out = []
    for nxt in (_git_next(tree, scratch, commit, goods, skipped), _git_next(tree, scratch, bad, [*goods, commit], skipped)):
        if nxt and nxt not in (commit, bad) and nxt not in out:
            out.append(nxt)
    return out


def bisect_next(tree: Path, scratch: Path) -> list[str]:
    """The commit git's bisect (in `tree`) asks for now, whatever is checked out there."""
    bad, goods, skipped = _bisect_refs(tree)
    nxt = _git_next(tree, scratch, bad, goods, skipped) if bad and goods else None
    return [nxt] if nxt and nxt != bad else []


def _bisect_refs(tree: Path) -> tuple[str | None, list[str], list[str]]:
    refs = git(tree, "for-each-ref", "--format=%(refname) %(objectname)", "refs/bisect/").stdout.split("\n")
    pairs = [ln.split() for ln in refs if ln.strip()]
    bad = next((sha for ref, sha in pairs if ref == "refs/bisect/bad"), None)
    goods = [sha for ref, sha in pairs if ref.startswith("refs/bisect/good-")]
    return bad, goods, [sha for ref, sha in pairs if ref.startswith("refs/bisect/skip-")]


def _git_next(tree: Path, scratch: Path, bad: str, goods: list[str], skipped: list[str]) -> str | None:
    if not (scratch / ".git").exists():
        git(tree, "worktree", "add", "--detach", "--no-checkout", "--force", str(scratch), bad)
    git(scratch, "bisect", "reset", check=False)
    if git(scratch, "bisect", "start", "--no-checkout", bad, *goods, check=False).returncode != 0:
        return None
    if skipped:
        git(scratch, "bisect", "skip", *skipped, check=False)
    return git(scratch, "rev-parse", "--verify", "--quiet", "BISECT_HEAD", check=False).stdout.strip() or None
