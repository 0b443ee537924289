"""Deterministic k-ary search over the commit graph, for one host or many, with git's semantics.

The state is git bisect's: the candidates are the ancestors of the lowest bad commit that are
not ancestors of any good one. A result on a commit that is no longer a candidate (it was in
flight when another result ruled it out) is logged and ignored, exactly as git would never have
asked for it. The search is over when every candidate but the lowest bad one is skipped: one
candidate left is the first bad commit; several (skips) are the candidate set, as git's
"only 'skip'ped commits left" list (the skipped candidates and the bad one).

Cut points are chosen by weight, as git does: the weight of x is how many candidates are x or
its ancestors (what is left if x is bad); a test at x leaves `weight` or `total - weight`. With
one host the best point is the one nearest half the total (git's choice). With N idle hosts the
weight line is cut into N+1 parts; tests already in flight are cut points too, so an idle host
goes to the widest gap. When a result arrives, `cancel()` names the in-flight tests that are no
longer candidates, and `propose()` cuts what is left again: asynchronous, no host waits for a
round to end.
"""

from __future__ import annotations

import bisect

from .base import Answer, Result, Search
from .graph import CommitGraph, members


class KarySearch(Search):
    name = "kary"

    def __init__(self, graph: CommitGraph, **options):
        super().__init__(graph, **options)
        self.remaining = graph.anc[graph.tip]  # bitset of candidates (all of the range)
        self.bad = graph.tip  # the lowest commit known bad
        self.skipped = 0
        self.tested: dict[int, Result] = {}

    # -- results ------------------------------------------------------------------------------
    def _record(self, i: int, result: Result, host: str | None) -> None:
        g, name = self.graph, self.graph.commits[i][:12]
        on = f" on {host}" if host else ""
        if result is Result.SKIP:
            self.skipped |= 1 << i
            self.log.append(f"skip {name}{on}: could not be tested")
            return
        if i in self.tested or not (self.remaining >> i & 1):
            why = "already tested" if i in self.tested else "no longer a candidate"
            self.log.append(f"{result.value} {name}{on}: ignored ({why})")
            return
        self.tested[i] = result
        if result is Result.GOOD:
            self.remaining &= ~g.anc[i]
        else:
            self.remaining &= g.anc[i]
            self.bad = i
        self.log.append(f"{result.value} {name}{on}: {self.remaining.bit_count()} candidates left")

    def _testable(self) -> int:
        return self.remaining & ~self.skipped & ~(1 << self.bad)

    @property
    def done(self) -> bool:
        return not self._testable()

    def _pointless(self) -> list[str]:
        return [c for c in self.in_flight if self.done or not (self.remaining >> self.graph.index[c] & 1)]

    # -- proposals ----------------------------------------------------------------------------
    def weights(self) -> dict[int, int]:
        """Weight of every candidate: how many candidates are it or its ancestors (git's
        count_distance; one `&` per merge, one addition per ordinary commit)."""
        g, rem = self.graph, self.remaining
        w: dict[int, int] = {}
        for x in members(rem):
            ps = g.parents[x]
            if len(ps) == 1:
                # A parent that is not a candidate is an ancestor of a good commit: so are all of its.
                w[x] = w.get(ps[0], 0) + 1
            elif not ps:
                w[x] = 1
            else:
                w[x] = (g.anc[x] & rem).bit_count()
        return w

    def propose(self, idle_hosts: int) -> list[str]:
        if self.done or idle_hosts <= 0:
            return []
        g = self.graph
        w = self.weights()
        total = w[self.bad]
        flying = {g.index[c] for c in self.in_flight}
        free = self._testable()
        cands = sorted((w[x], x) for x in members(free) if x not in flying)
        if not cands:
            return []
        # Gaps on the weight line between tests in flight; give each idle host to the gap whose
        # parts would stay widest.
        cuts = sorted({0, total, *(w[x] for x in flying if x in w)})
        gaps = [[lo, hi, 0] for lo, hi in zip(cuts, cuts[1:])]
        for _ in range(min(idle_hosts, len(cands))):
            gap = max(gaps, key=lambda gp: ((gp[1] - gp[0]) / (gp[2] + 1), -gp[0]))
            gap[2] += 1
        targets = [lo + (hi - lo) * j / (k + 1) for lo, hi, k in gaps for j in range(1, k + 1)]
        keys = [c[0] for c in cands]
        out: list[str] = []
        taken: set[int] = set()
        for t in targets:
            best = self._nearest(cands, keys, t, taken)
            if best is not None:
                taken.add(best)
                out.append(g.commits[best])
        return out

    @staticmethod
    def _nearest(cands, keys, target: float, taken: set[int]) -> int | None:
        """The free candidate whose weight is nearest `target` (ties: the lighter, then the earlier)."""
        j = bisect.bisect_left(keys, target)
        lo, hi = j - 1, j
        while lo >= 0 or hi < len(cands):
            left = cands[lo] if lo >= 0 else None
            right = cands[hi] if hi < len(cands) else None
            if left is not None and left[1] in taken:
                lo -= 1
                continue
            if right is not None and right[1] in taken:
                hi += 1
                continue
            if right is None or (left is not None and target - left[0] <= right[0] - target):
                return left[1]
            return right[1]
        return None

    # -- the answer ---------------------------------------------------------------------------
    def answer(self) -> Answer:
        g = self.graph
        left = [x for x in members(self.remaining) if x != self.bad] + [self.bad]
        names = [g.commits[x] for x in left]
        if not self.done:
            return Answer(None, names, 0.0, None, self.runs, list(self.log) + ["not finished"])
        if len(left) == 1:
            line = f"{names[0]} is the first bad commit"
            return Answer(names[0], names, 1.0, None, self.runs, list(self.log) + [line])
        line = (f"only skipped commits are left to test; the first bad commit is one of {len(names)}: "
                + " ".join(n[:12] for n in names))
        return Answer(None, names, 1.0, None, self.runs, list(self.log) + [line])
