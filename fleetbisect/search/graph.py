"""The commit graph a search works on: the range good..bad with its merges, as integers.

Commits are numbered in one *linear order*: a depth-first post-order from the bad end that visits
first parents before the others. Every commit comes after its parents, and each merged side
branch sits as one block just before its merge commit, so:

- for a commit on the first-parent line from the bad end (the *mainline*), its ancestors in the
  range are exactly the commits before it (a prefix of the order);
- for a commit on a side branch, its ancestors are a few intervals (the prefix up to where the
  branch forked, then the branch block up to the commit).

Ancestor sets are Python ints used as bitsets (bit i = commit i), so "ancestors of x that are
still candidates" is one `&` and one `bit_count()`, and `intervals(x)` turns a set into the few
runs the Bayesian search needs. The range follows git's own: `git rev-list bad --not good`,
with `--first-parent` and pathspec limits as `git bisect start --first-parent ... -- paths`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..errors import UserError


class CommitGraph:
    """commits[i] is the name of commit i; parents[i] are the indices of its parents in range.
    The last commit is the bad end (known bad); the good ends are outside the range."""

    def __init__(self, names: Sequence[str], parents: Mapping[str, Sequence[str]], bad: str):
        if bad not in parents:
            raise UserError(f"the bad end {bad} is not in the range (is it an ancestor of the good end?)")
        order = _post_order(bad, parents)
        if len(order) != len(names):
            raise UserError(f"{len(names) - len(order)} commits of the range are not ancestors of {bad}")
        self.commits: list[str] = order
        self.index: dict[str, int] = {c: i for i, c in enumerate(order)}
        self.parents: list[tuple[int, ...]] = [
            tuple(self.index[p] for p in parents[c] if p in self.index) for c in order
        ]
        self.n = len(order)
        self.tip = self.n - 1
        anc: list[int] = []
        for i, ps in enumerate(self.parents):
            a = 1 << i
            for p in ps:
                a |= anc[p]
            anc.append(a)
        self.anc = anc
        self.merges = sum(1 for ps in self.parents if len(ps) > 1)
        self._intervals: dict[int, tuple[tuple[int, int], ...]] = {}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_parents(cls, parents: Mapping[str, Sequence[str]], bad: str) -> "CommitGraph":
        """A graph from {commit: [parents]} (parents outside the mapping are the good side)."""
        return cls(list(parents), parents, bad)

    @classmethod
    def from_git(cls, repo: Path, good: str | Iterable[str], bad: str, *, first_parent: bool = False,
                 paths: Sequence[str] = ()) -> "CommitGraph":
        goods = [good] if isinstance(good, str) else list(good)
        argv = ["git", "-C", str(repo), "rev-list", "--parents", "--topo-order"]
        if first_parent:
            argv.append("--first-parent")
        argv += [_rev(repo, bad), "--not", *(_rev(repo, g) for g in goods)]
        if paths:
            argv += ["--", *paths]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"git rev-list failed in {repo}: {proc.stderr.strip()}")
        parents: dict[str, list[str]] = {}
        for line in proc.stdout.splitlines():
            c, *ps = line.split()
            parents[c] = ps[:1] if first_parent else ps
        tip = _rev(repo, bad)
        if not parents:
            raise UserError(f"no commit in {' '.join(goods)}..{bad}" + (f" touches {' '.join(paths)}" if paths else ""))
        if tip not in parents:  # the bad end does not touch the paths: it still stands above them all
            children = {p for ps in parents.values() for p in ps}
            parents[tip] = [c for c in parents if c not in children]
        return cls(list(parents), parents, tip)

    # -- queries ------------------------------------------------------------------------------
    def is_ancestor(self, a: int, b: int) -> bool:
        """a is b or an ancestor of b."""
        return bool(self.anc[b] >> a & 1)

    def intervals(self, i: int) -> tuple[tuple[int, int], ...]:
        """The ancestors of i (i included) as half-open runs [lo, hi) of the linear order."""
        got = self._intervals.get(i)
        if got is None:
            got = self._intervals[i] = runs(self.anc[i])
        return got

    def mask(self, indices: Iterable[int]) -> int:
        m = 0
        for i in indices:
            m |= 1 << i
        return m


def runs(bits: int) -> tuple[tuple[int, int], ...]:
    """The runs of set bits of `bits` as [lo, hi) pairs, lowest first."""
    out = []
    base = 0
    while bits:
        low = (bits & -bits).bit_length() - 1
        bits >>= low
        base += low
        length = (~bits & (bits + 1)).bit_length() - 1
        out.append((base, base + length))
        bits >>= length
        base += length
    return tuple(out)


def members(bits: int) -> list[int]:
    """The set bits of `bits`, lowest first."""
    return [i for lo, hi in runs(bits) for i in range(lo, hi)]


def _rev(repo: Path, rev: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"{rev!r} is not a commit in {repo}")
    return proc.stdout.strip()


def _post_order(bad: str, parents: Mapping[str, Sequence[str]]) -> list[str]:
    """Depth-first post-order from `bad`, first parents first, without recursion (deep histories)."""
    order: list[str] = []
    seen = {bad}
    stack: list[tuple[str, int]] = [(bad, 0)]
    while stack:
        c, k = stack.pop()
        ps = parents[c]
        while k < len(ps) and (ps[k] in seen or ps[k] not in parents):
            k += 1
        if k < len(ps):
            stack.append((c, k + 1))
            seen.add(ps[k])
            stack.append((ps[k], 0))
        else:
            order.append(c)
    return order
