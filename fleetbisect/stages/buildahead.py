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

`BuildAhead` runs `build.ahead` builds at once. With git's bisect the first is the run's own
tree (`home`): git's bisect runs with --no-checkout, so the tree is idle from the moment the
step's artifacts are in the cache (the step pushes the cache's copies) until the next step
checks out its commit (`Builds.checkout`); meanwhile it checks out and builds what may come
next, incrementally and with no copy. When the next commit is the one it built (or is
building: waited for), that step's build is a cache hit; when it is not, the build ahead is
stopped and the step builds from where it was, still incrementally. The others (and all of a
fleet's) each use a worktree of their own under RUN_DIR/ahead/ (a copy of the run's built tree;
kept for the run), and start only while the disk holding them has `build.ahead_min_free` free.
Builds ahead run at nice 10: the step's own build and the guest under test keep the cores.
`want(commits)` replaces what is wanted: a build ahead of a commit no longer wanted is stopped,
and so is every other one when the step needs a commit nobody built (`get`). Stopping is
SIGTERM to the build's process group (make deletes the targets it was writing: a half-written
object with a new mtime would pass for built), SIGKILL only after GRACE. A build ahead that
fails is not kept: the step builds the commit itself, with its log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
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


GRACE = 10.0  # seconds a cancelled build has to stop on SIGTERM before it is killed
NICE = 10  # builds ahead yield the cores to the step's own build and to the guest under test


@dataclass
class _Slot:
    tree: Path
    commit: str | None = None  # building now
    cancelled: bool = False
    cancelled_at: float = 0.0
    home: bool = False  # the run's own tree, used while the step does not need it
    pid_path: Path | None = None

    @property
    def pidfile(self) -> Path:
        return self.pid_path or self.tree.parent / f"{self.tree.name}.{PIDFILE}"


class BuildAhead:
    def __init__(self, repo: Path, playbook, base: Path, cache: BuildCache, log=lambda msg: None,
                 seed: Path | None = None, home: Path | None = None):
        """`home`: the run's own tree: it builds ahead itself between `open_home()` (the step's
        artifacts are in the cache) and `claim_home()` (the step needs the tree), with no copy,
        incrementally; the other `build.ahead - 1` slots are worktrees copied from it (`seed`)."""
        self.repo, self.playbook, self.base, self.cache, self.log = repo, playbook, base, cache, log
        self.seed = seed or home  # a built tree a new worktree starts from (the run's): no full first build
        self.seed_lock = threading.Lock()  # held while the seed tree builds, or is copied
        n = playbook.build.ahead
        self.slots = ([_Slot(home, home=True, pid_path=base / f"home.{PIDFILE}")] if home else []) + \
                     [_Slot(base / f"tree{i}") for i in range(n - 1 if home else n)]
        self.home_open = False
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
            self._wait(lambda: any(s.commit and (s.commit == commit or s.cancelled) for s in self.slots),
                       deadline)
            return self.built.get(commit)

    def claim_home(self, commit: str, deadline: Deadline) -> None:
        """The step is about to check out `commit` in the run's tree: its build ahead there is
        waited for when it is of `commit` (what the step would build), else stopped; the tree
        builds nothing ahead until `open_home()`."""
        with self.cond:
            self.home_open = False
            for slot in self.slots:
                if slot.home and slot.commit and slot.commit != commit:
                    self._cancel(slot)
            self._wait(lambda: any(s.home and s.commit for s in self.slots), deadline)

    def open_home(self) -> None:
        """The step's artifacts are in the cache: the run's tree may build ahead."""
        with self.cond:
            self.home_open = True
            self.cond.notify_all()

    def _wait(self, busy, deadline: Deadline) -> None:
        """Until `busy()` is false; cancelled builds are asked again (a cancel that came between
        two commands of a build misses the second), and killed after GRACE."""
        while busy() and not deadline.expired:
            self.cond.wait(min(0.2, max(0.01, deadline.remaining())))
            for slot in self.slots:
                if slot.commit and slot.cancelled:
                    late = time.monotonic() - slot.cancelled_at > GRACE
                    kill_orphan(slot.pidfile, signal.SIGKILL if late else signal.SIGTERM)

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
        """Stop a build ahead: SIGTERM to its process group (ours), so that make deletes the
        targets it was writing (a half-written object file with a new mtime would be taken as
        built by the next make in that tree); SIGKILL only if it has not stopped after GRACE."""
        if not slot.cancelled:
            slot.cancelled, slot.cancelled_at = True, time.monotonic()
        kill_orphan(slot.pidfile, signal.SIGTERM)

    def _next(self, slot: _Slot) -> str | None:
        with self.cond:
            while not self.closed:
                busy = {s.commit for s in self.slots}
                todo = [c for c in self.wanted if c not in busy and c not in self.built]
                if todo and (self.home_open or not slot.home) and self._room():
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
                # the run's tree: not while it is copied for another slot
                with self.seed_lock if slot.home else contextlib.nullcontext():
                    if not slot.cancelled:
                        git(slot.tree, "checkout", "--quiet", "--force", "--detach", commit)
                    if not slot.cancelled:
                        started = time.monotonic()
                        result = build(slot.tree, self.playbook, commit,
                                       self.base / "logs" / f"{commit[:12]}.log",
                                       Deadline.after(self.playbook.build.timeout), slot.pidfile, self.cache,
                                       nice=NICE)
                        if result.ok and not slot.cancelled:
                            where = " in the run's tree" if slot.home else ""
                            self.log(f"built {commit[:12]} ahead{where} in {time.monotonic() - started:.0f}s")
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
            if not slot.home and (slot.tree / ".git").exists():
                git(self.repo, "worktree", "remove", "--force", str(slot.tree), check=False)


class Builds:
    """The build stage as a run uses it: its cache, and its builds ahead (build.ahead > 0)."""

    def __init__(self, repo: Path, playbook, run_dir: Path, log=lambda msg: None, home: Path | None = None):
        """`home`: the run's own tree (git's bisect): it builds ahead itself while the step does
        not need it (`checkout` claims it back)."""
        self.cache = BuildCache.for_playbook(playbook, run_dir / "build-cache")
        self.ahead = (BuildAhead(repo, playbook, run_dir / "ahead", self.cache, log, home=home)
                      if playbook.build.ahead and self.cache else None)
        self.upcoming: Callable[[str], list[str]] | None = None
        self.log, self.repo, self.base = log, repo, run_dir / "ahead"

    def checkout(self, tree: Path, commit: str, deadline: Deadline) -> None:
        """Check `commit` out in `tree` for the step, once no build ahead uses that tree (one of
        `commit` itself is waited for: it is what the step would build)."""
        if self.ahead is not None:
            self.ahead.claim_home(commit, deadline)
        if git(tree, "rev-parse", "HEAD").stdout.strip() != commit:
            git(tree, "checkout", "--quiet", "--force", "--detach", commit)

    def build(self, tree: Path, playbook, commit: str, log_path: Path, deadline: Deadline, on=None) -> BuildResult:
        """The build stage: check `commit` out in `tree` (git's bisect leaves that to us), then
        build it, through the cache; waiting for a build ahead is part of the stage."""
        self.checkout(tree, commit, deadline)
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
        if self.ahead is not None and result.ok:
            self.ahead.open_home()  # its artifacts are the cache's now: the tree may build ahead
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
