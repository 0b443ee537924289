"""Drive git's own bisect in a worktree of the run's own.

The user's checkout is never touched: the run adds a detached worktree (sharing the object
store, so it is cheap even for a kernel tree) and bisects there. `refs/bisect/*` and
BISECT_LOG are per-worktree in git, so a bisect the user has going is not disturbed either.
"""

from __future__ import annotations

import errno
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..verdict import Verdict


def git(repo: Path, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0 and _NO_SPACE in proc.stdout + proc.stderr:
        # A full disk is the machine's state, not the user's input nor a verdict: say so.
        raise OSError(errno.ENOSPC, f"{_NO_SPACE} (git {args[0]})", str(repo))
    if check and proc.returncode != 0:
        raise UserError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.strip()}")
    return proc


_NO_SPACE = "No space left on device"


def resolve(repo: Path, rev: str) -> str:
    proc = git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if proc.returncode != 0:
        raise UserError(f"{rev!r} is not a commit in {repo}")
    return proc.stdout.strip()


def subject(repo: Path, commit: str) -> str:
    return git(repo, "log", "-1", "--format=%s", commit).stdout.strip()


@dataclass(frozen=True)
class MarkResult:
    culprit: str | None  # set when git names the first bad commit
    candidates: tuple[str, ...] = ()  # set when only skipped commits are left
    done: bool = False


_FIRST_BAD = re.compile(r"^([0-9a-f]{40}) is the first bad commit", re.MULTILINE)
_ONLY_SKIPPED = "There are only 'skip'ped commits left to test"


class Bisect:
    def __init__(self, worktree: Path):
        self.tree = worktree

    @classmethod
    def create(cls, repo: Path, worktree: Path, good: str, bad: str) -> "Bisect":
        """Add the worktree (reusing it when it is already ours) and start bisecting."""
        if not (worktree / ".git").exists():
            worktree.parent.mkdir(parents=True, exist_ok=True)
            git(repo, "worktree", "add", "--detach", str(worktree), bad)
        else:
            # Ours, left by a run that died: a checkout or a cherry-pick may be half done (a full
            # disk, SIGKILL). Tracked files go back to HEAD; build outputs (ignored) stay, so the
            # next build is still incremental.
            git(worktree, "reset", "--hard", "--quiet")
            git(worktree, "clean", "-fd", "--quiet")
        b = cls(worktree)
        git(worktree, "bisect", "reset", check=False)
        # --no-checkout: git names the next commit (BISECT_HEAD) and leaves the tree alone; the
        # run checks out what it builds, so that a build ahead may use the tree meanwhile
        git(worktree, "bisect", "start", "--no-checkout", bad, good)
        return b

    def head(self) -> str:
        """The commit git's bisect asks for now."""
        return git(self.tree, "rev-parse", "BISECT_HEAD").stdout.strip()

    def mark(self, verdict: Verdict, commit: str) -> MarkResult:
        word = {Verdict.GOOD: "good", Verdict.BAD: "bad", Verdict.SKIP: "skip"}[verdict]
        proc = git(self.tree, "bisect", word, commit, check=False)
        out = proc.stdout + proc.stderr
        m = _FIRST_BAD.search(out)
        if m:
            return MarkResult(m.group(1), done=True)
        if _ONLY_SKIPPED in out:
            cands = tuple(re.findall(r"^([0-9a-f]{40})\b", out, re.MULTILINE))
            return MarkResult(None, cands, done=True)
        if proc.returncode != 0:
            raise UserError(f"git bisect {word} failed: {out.strip()}")
        return MarkResult(None)

    def log(self) -> str:
        return git(self.tree, "bisect", "log", check=False).stdout

    def remaining(self) -> int:
        """Commits git still has to choose between (for the steps-left estimate)."""
        proc = git(self.tree, "rev-list", "--count", "refs/bisect/bad", "--not",
                   *self._goods(), check=False)
        return int(proc.stdout.strip() or 0) if proc.returncode == 0 else 0

    def _goods(self) -> list[str]:
        out = git(self.tree, "for-each-ref", "--format=%(objectname)", "refs/bisect/good-*").stdout
        return out.split()

    def finish(self, repo: Path, remove: bool = True) -> None:
        git(self.tree, "bisect", "reset", "--quiet", check=False)
        if remove:
            git(repo, "worktree", "remove", "--force", str(self.tree), check=False)
