"""Flake-aware Bayesian bisection: a bad kernel may pass by luck, a good one almost never fails.

As in Google's "Flake Aware Culprit Finding" (Henderson et al., 2023): the search keeps a
posterior over "commit i is the culprit" and treats every run (one boot) as evidence:

    P(fail | x is bad)  = p   (the hit rate: a bad kernel passes by luck with 1 - p)
    P(fail | x is good) = e   (false alarms: a good kernel almost never fails)

and x is bad exactly when the culprit is x or one of its ancestors. The prior is uniform over
the range good..bad (the bad end included, the good end not).

Merges: the posterior lives on the graph's linear order (graph.py: a post-order in which every
side branch is one block before its merge). The ancestors of any commit are a few runs of that
order, so a run's likelihood is applied exactly, on the real graph, to a piecewise-constant
posterior (segments between the runs' ends): no per-commit arrays, thousands of commits cost
nothing. Next tests are chosen on the order: the commit whose ancestors hold the target mass
(one host: the mass that maximises the expected information of one run, since the noise is
one-sided; N hosts: the N quantiles), refined by the exact ancestor mass of its neighbours.
The only approximation is for skips: commits between two testable commits of the linear order
are taken as indistinguishable (exact on a linear history and on a side branch's block).

The search stops when one commit, or one group of commits that skips make indistinguishable,
holds `confidence` of the posterior, or when `budget` runs are spent (then it names no culprit,
only its best guess and that guess's probability).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from .base import Answer, Result, Search
from .graph import CommitGraph


def _h(q: float) -> float:
    return 0.0 if q <= 0 or q >= 1 else -(q * math.log2(q) + (1 - q) * math.log2(1 - q))


def information(m: float, p: float, e: float) -> float:
    """Expected information (bits) of one run of a commit whose ancestors hold mass m."""
    return _h(p * m + e * (1 - m)) - m * _h(p) - (1 - m) * _h(e)


_GRID = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)  # masses to look near
_USEFUL = 1e-5  # bits: a run that tells less than this is not worth a boot


class BayesSearch(Search):
    name = "bayes"

    def __init__(self, graph: CommitGraph, hit_rate: float = 0.5, false_alarm: float = 0.001,
                 confidence: float = 0.99, budget: int | None = None, **options):
        super().__init__(graph, hit_rate=hit_rate, false_alarm=false_alarm, confidence=confidence,
                         budget=budget, **options)
        if not (0 < hit_rate <= 1 and 0 <= false_alarm < hit_rate and 0.5 < confidence < 1):
            raise ValueError("need 0 < hit_rate <= 1, 0 <= false_alarm < hit_rate, 0.5 < confidence < 1")
        self.p, self.e, self.confidence = hit_rate, false_alarm, confidence
        self.budget = budget if budget is not None else 20 * max(1, graph.n.bit_length()) + 50
        # log-likelihood factors: [culprit outside anc(x), inside] for a pass and for a failure
        p, e = min(hit_rate, 1 - 1e-9), max(false_alarm, 1e-12)
        self._factor = {Result.GOOD: (math.log1p(-e), math.log1p(-p)), Result.BAD: (math.log(e), math.log(p))}
        self.bounds = [0, graph.n]  # segment k is [bounds[k], bounds[k+1])
        self.logw = [0.0]
        self.skipped: set[int] = set()
        self.observed: dict[int, list[int]] = {}  # position -> [passes, failures]
        self._hp, self._he = _h(self.p), _h(self.e)
        self.m_one = max((information(k / 1000, self.p, self.e), k / 1000) for k in range(1, 1000))[1]
        self._cache = self._cands = None

    # -- evidence -----------------------------------------------------------------------------
    def _record(self, i: int, result: Result, host: str | None) -> None:
        name, on = self.graph.commits[i][:12], (f" on {host}" if host else "")
        if result is Result.SKIP:
            self.skipped.add(i)
            self._cands = None
            self.log.append(f"skip {name}{on}: could not be tested")
            return
        obs = self.observed.setdefault(i, [0, 0])
        obs[result is Result.BAD] += 1
        runs = self.graph.intervals(i)
        for lo, hi in runs:
            self._split(lo)
            self._split(hi)
        out_f, in_f = self._factor[result]
        k, r = 0, 0
        for k in range(len(self.logw)):
            lo = self.bounds[k]
            while r < len(runs) and runs[r][1] <= lo:
                r += 1
            inside = r < len(runs) and runs[r][0] <= lo
            self.logw[k] += in_f if inside else out_f
        top = max(self.logw)
        self.logw = [w - top for w in self.logw]
        self._cache = self._cands = None
        c, conf = self._top()
        word = "failed" if result is Result.BAD else "passed"
        self.log.append(f"{name}{on} {word} ({obs[0]} passed, {obs[1]} failed there); best now "
                        f"{self.graph.commits[c][:12]} at {conf:.3f}")

    def _split(self, x: int) -> None:
        k = bisect.bisect_right(self.bounds, x) - 1
        if 0 < x < self.graph.n and self.bounds[k] != x:
            self.bounds.insert(k + 1, x)
            self.logw.insert(k + 1, self.logw[k])

    # -- the posterior ------------------------------------------------------------------------
    def _masses(self):
        """(density per commit of each segment, cumulative mass before each bound), normalised."""
        if self._cache is None:
            dens = [math.exp(w) for w in self.logw]
            cum = [0.0]
            for k, d in enumerate(dens):
                cum.append(cum[-1] + d * (self.bounds[k + 1] - self.bounds[k]))
            z = cum[-1]
            self._cache = ([d / z for d in dens], [c / z for c in cum])
        return self._cache

    def _before(self, x: int) -> float:
        """Posterior mass of the positions before x."""
        dens, cum = self._masses()
        k = min(bisect.bisect_right(self.bounds, x) - 1, len(dens) - 1)
        return cum[k] + (x - self.bounds[k]) * dens[k]

    def mass(self, i: int) -> float:
        """P(commit i is bad) = posterior mass of i and its ancestors."""
        return sum(self._before(hi) - self._before(lo) for lo, hi in self.graph.intervals(i))

    def probability(self, i: int) -> float:
        return self._masses()[0][bisect.bisect_right(self.bounds, i) - 1]

    def _top(self, exclude: range = range(0)) -> tuple[int, float]:
        """The most likely culprit outside `exclude` (the last commit of the densest segment) and
        its probability."""
        dens, _ = self._masses()
        best, at = -1.0, -1
        for k, d in enumerate(dens):
            lo, hi = self.bounds[k], self.bounds[k + 1]
            last = hi - 1 if not (exclude.start <= hi - 1 < exclude.stop) else exclude.start - 1
            if last >= lo and d > best:
                best, at = d, last
        return at, best

    def _testable(self, x: int) -> bool:
        return x not in self.skipped and x != self.graph.tip

    def group(self, c: int) -> range:
        """c with the untestable commits that skips leave indistinguishable from it (linear order)."""
        hi = c
        while hi < self.graph.tip and not self._testable(hi):
            hi += 1
        lo = hi
        while lo > 0 and not self._testable(lo - 1):
            lo -= 1
        return range(lo, hi + 1)

    def _best_group(self) -> tuple[range, float]:
        c, _ = self._top()
        g = self.group(c)
        return g, self._before(g.stop) - self._before(g.start)

    @property
    def done(self) -> bool:
        if self.runs >= self.budget or self._best_group()[1] >= self.confidence:
            return True
        return not self.in_flight and not self._candidates()  # nothing left that a run could tell

    # -- proposals ----------------------------------------------------------------------------
    def _targets(self, k: int) -> list[float]:
        return [self.m_one] if k == 1 else [j / (k + 1) for j in range(1, k + 1)]

    def _candidates(self) -> list[tuple[float, float, int]]:
        """(information, mass, commit) of the testable commits worth a run among: the mainline
        around a grid of masses, and the ends and middle of the likeliest segments (on a
        side branch the ancestors' mass is not the cumulative one). If none is worth a run, all."""
        if self._cands is not None:
            return self._cands
        dens, cum = self._masses()
        picks: set[int] = set()
        for m in _GRID:
            k = max(0, min(bisect.bisect_left(cum, m) - 1, len(dens) - 1))
            x = self.bounds[k] + (int((m - cum[k]) / dens[k]) if dens[k] > 0 else 0)
            picks.update((x - 1, x, x + 1))
        heavy = sorted(range(len(dens)), key=lambda k: -(cum[k + 1] - cum[k]))[:6]
        for k in heavy:
            lo, hi = self.bounds[k], self.bounds[k + 1]
            picks.update((lo - 1, lo, (lo + hi) // 2, hi - 1))
        cands = self._score(x for x in picks if 0 <= x < self.graph.n)
        if not cands:
            cands = self._score(range(self.graph.n))
        self._cands = cands
        return cands

    def _score(self, xs) -> list[tuple[float, float, int]]:
        xs = [x for x in xs if self._testable(x)]
        ivs = {x: self.graph.intervals(x) for x in xs}
        # The mass before every interval end, in one sweep over the segments (not one search each).
        dens, cum = self._masses()
        before, k, bounds = {}, 0, self.bounds
        for pt in sorted({pt for runs in ivs.values() for iv in runs for pt in iv}):
            while k + 1 < len(dens) and bounds[k + 1] <= pt:
                k += 1
            before[pt] = cum[k] + (pt - bounds[k]) * dens[k]
        out = []
        for x in xs:
            m = sum(before[hi] - before[lo] for lo, hi in ivs[x])
            info = _h(self.p * m + self.e * (1 - m)) - m * self._hp - (1 - m) * self._he  # information()
            if info > _USEFUL:
                out.append((info, m, x))
        return sorted(out, key=lambda c: c[2])

    def _at_mass(self, m: float, alone: bool) -> int | None:
        """Of the commits worth a run, the most informative (one host) or the one whose
        ancestors' mass is nearest m (several hosts)."""
        cands = self._candidates()
        if not cands:
            return None
        if alone:
            return max(cands, key=lambda c: (c[0], -c[2]))[2]
        return min(cands, key=lambda c: (abs(c[1] - m), c[2]))[2]

    def propose(self, idle_hosts: int) -> list[str]:
        if self.done or idle_hosts <= 0:
            return []
        flying = [self.graph.index[c] for c, hosts in self.in_flight.items() for _ in hosts]
        targets = self._targets(len(flying) + idle_hosts)
        for f in flying:  # a test in flight already covers the target nearest its mass
            mf = self.mass(f)
            targets.remove(min(targets, key=lambda t: abs(t - mf)))
        out = []
        for t in targets:
            x = self._at_mass(t, alone=len(targets) == 1 and not flying)
            if x is not None:
                out.append(self.graph.commits[x])
        return out

    def _pointless(self) -> list[str]:
        if self.done:
            return list(self.in_flight)
        return [c for c in self.in_flight if information(self.mass(self.graph.index[c]), self.p, self.e) <= _USEFUL]

    # -- the answer ---------------------------------------------------------------------------
    def _smallest_set(self, limit: int = 64) -> tuple[list[int], float]:
        """The fewest commits holding `confidence` of the posterior (densest first), at most `limit`."""
        dens, _ = self._masses()
        out, total = [], 0.0
        for k in sorted(range(len(dens)), key=lambda k: (-dens[k], -self.bounds[k])):
            for x in range(self.bounds[k + 1] - 1, self.bounds[k] - 1, -1):
                if total >= self.confidence or len(out) >= limit:
                    return sorted(out), total
                out.append(x)
                total += dens[k]
        return sorted(out), total

    def answer(self) -> Answer:
        grp, conf = self._best_group()
        members = list(grp)
        stuck = conf < self.confidence and self.runs < self.budget and self.done
        if stuck:  # no run can tell the likeliest commits apart (skips across merges): name them all
            members, conf = self._smallest_set()
        names = [self.graph.commits[i] for i in members]
        ru, _ = self._top(exclude=range(members[0], members[-1] + 1))
        runner = self.graph.commits[ru] if ru >= 0 else None
        log = list(self.log)
        if conf >= self.confidence:
            culprit = names[0] if len(names) == 1 else None
            what = f"{names[0]} is the first bad commit" if culprit else \
                f"the first bad commit is one of {len(names)} that no run can tell apart: " + " ".join(n[:12] for n in names)
            log.append(f"{what}, with probability {conf:.4f} after {self.runs} runs"
                       + (f"; runner-up {runner[:12]}" if runner else ""))
            return Answer(culprit, names, conf, runner, self.runs, log)
        why = "no run can tell more" if stuck else f"the budget of {self.budget} runs is spent"
        log.append(f"{why}: the best guess {names[-1][:12]} has only probability {conf:.4f} (asked {self.confidence})")
        return Answer(None, names, conf, runner, self.runs, log)


@dataclass(frozen=True)
class Calibration:
    """A hit rate (or false-alarm rate) estimated from runs, with its Wilson score interval."""

    failures: int
    runs: int
    estimate: float
    low: float
    high: float
    level: float = 0.95

    @classmethod
    def from_runs(cls, failures: int, runs: int, level: float = 0.95) -> "Calibration":
        if runs <= 0 or not 0 <= failures <= runs:
            raise ValueError("need 0 <= failures <= runs and runs > 0")
        z = {0.9: 1.6449, 0.95: 1.96, 0.99: 2.5758}.get(level) or _z(level)
        ph = failures / runs
        centre = (ph + z * z / (2 * runs)) / (1 + z * z / runs)
        half = z / (1 + z * z / runs) * math.sqrt(ph * (1 - ph) / runs + z * z / (4 * runs * runs))
        return cls(failures, runs, ph, max(0.0, centre - half), min(1.0, centre + half), level)

    def __str__(self) -> str:
        return (f"{self.estimate:.2f} ({self.failures}/{self.runs} runs failed; {self.level:.0%} interval "
                f"{self.low:.2f}-{self.high:.2f})")


def _z(level: float) -> float:
    """The two-sided normal quantile for `level`, by bisection on erf."""
    lo, hi = 0.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erf(mid / math.sqrt(2)) < level else (lo, mid)
    return (lo + hi) / 2
