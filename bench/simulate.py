"""Drive the real searches against synthetic histories: accuracy, runs, rounds and wall time.

No SSH, no QEMU: a history of thousands of commits with merges and unbuildable stretches, a
culprit, a reproducer that catches a bad kernel with probability p (and a good one with 0.001),
N hosts with different step times, and an event-driven clock. Each cell is many seeded bisects.

    python bench/simulate.py                 # the full table (1000 bisects per cell, 10,000 commits)
    python bench/simulate.py --quick         # a smoke test (seconds)

The full table and how to read it: bench/README.md.

Methods, all driving fleetbisect.search:
  bisect   the deterministic k-ary search trusting every single result (with 1 host: git bisect)
  repeat3  the same, each test up to 3 boots on its host, bad on any failure (ktest's BISECT_TRIES)
  bayes    the flake-aware Bayesian search told p, stopping at confidence 0.99

right: the culprit named (or a candidate set holding it); wrong: a culprit named that is not it
(the rest named nothing: a budget spent); runs: boots (and failed builds) recorded; rounds: the longest chain of tests each proposed after
the previous one's result; wall: simulated time in units of the fastest host's step.
Hosts: host h of N takes 1 + 0.5 h/(N-1) steps per run (+-10% jitter); a failed build costs 0.3.
With --lockstep all hosts take exactly one step per run (and per failed build): rounds are then
synchronous rounds, the ones the ceil(log_{N+1} M) + 1 bound speaks of.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetbisect.search import select  # noqa: E402
from fleetbisect.search.base import Result  # noqa: E402
from fleetbisect.search.graph import CommitGraph  # noqa: E402

FALSE_ALARM = 0.001


def history(n: int, seed: int) -> tuple[CommitGraph, set[int]]:
    """A mainline with side branches (forked from the mainline or from other branches, merged
    back), about 10% merges, and a few unbuildable stretches (indices in the linear order)."""
    rnd = random.Random(seed)
    parents: dict[str, list[str]] = {"0": []}
    heads = {"main": "0"}
    k = 1
    while k < n - len(heads) + 1:  # room left to merge every open branch back, one by one
        open_ = [b for b in heads if b != "main"]
        r = rnd.random()
        if r < 0.08:
            src = rnd.choice(["main", *open_])
            heads[f"b{k}"], parents[str(k)] = str(k), [heads[src]]
        elif r < 0.35 and open_:
            b = rnd.choice(open_)
            parents[str(k)], heads[b] = [heads[b]], str(k)
        elif r < 0.42 and open_:
            b = rnd.choice(open_)
            parents[str(k)] = [heads["main"], heads.pop(b)]
            heads["main"] = str(k)
        else:
            parents[str(k)], heads["main"] = [heads["main"]], str(k)
        k += 1
    for b in [b for b in heads if b != "main"]:
        parents[str(k)], heads["main"] = [heads["main"], heads.pop(b)], str(k)
        k += 1
    g = CommitGraph.from_parents(parents, heads["main"])
    broken: set[int] = set()
    for _ in range(max(1, n // 2000)):
        at = rnd.randrange(g.n - 30)
        broken.update(range(at, at + rnd.randint(1, 20)))
    return g, broken


def bisect_once(g: CommitGraph, broken: set[int], method: str, p: float, hosts: int, seed: int,
                lockstep: bool = False) -> dict:
    rnd = random.Random(seed)
    culprit = rnd.randrange(g.n)
    if method == "bayes":
        search = select("bayes")(g, hit_rate=p, false_alarm=FALSE_ALARM, confidence=0.99)
    else:
        search = select("kary")(g)
    tries = 3 if method == "repeat3" else 1
    speed = [1 + (0.5 * h / (hosts - 1) if hosts > 1 and not lockstep else 0) for h in range(hosts)]
    idle = list(range(hosts))
    heap: list = []  # (finish, seq, host, commit, result, boots, round)
    running: dict[int, tuple] = {}
    now, seq, boots, known_round, rounds = 0.0, 0, 0, 0, 0
    while not search.done:
        for c in search.cancel():
            h = next(h for h, job in running.items() if job[3] == c)
            del running[h]
            idle.append(h)
        idle.sort()
        for c in search.propose(len(idle)):
            h = idle.pop(0)
            i = g.index[c]
            search.started(c, f"h{h}")
            if i in broken:
                result, n_boots, cost = Result.SKIP, 0, 1 if lockstep else 0.3
            else:
                bad = g.is_ancestor(culprit, i)
                n_boots, result = 0, Result.GOOD
                while n_boots < tries and result is Result.GOOD:
                    n_boots += 1
                    if rnd.random() < (p if bad else FALSE_ALARM):
                        result = Result.BAD
                cost = n_boots if lockstep else sum(rnd.uniform(0.9, 1.1) for _ in range(n_boots))
            seq += 1
            job = (now + cost * speed[h], seq, h, c, result, n_boots, known_round + 1)
            running[h] = job
            heapq.heappush(heap, job)
        if not heap:
            break
        now = heap[0][0]
        while heap and heap[0][0] == now:
            job = heapq.heappop(heap)
            h = job[2]
            if running.get(h) is not job:
                continue  # cancelled
            del running[h]
            idle.append(h)
            search.record(job[3], job[4], f"h{h}")
            boots += max(job[5], 1)
            rounds = max(rounds, job[6])
        known_round = rounds
    a = search.answer()
    name = g.commits[culprit]
    named = a.culprit is not None or a.confidence >= 0.99  # an answer, not a budget's best guess
    right = a.culprit == name if a.culprit else (named and name in a.candidates)
    return {"right": right, "wrong": named and not right, "runs": boots, "rounds": rounds, "wall": now}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--commits", type=int, default=10_000)
    ap.add_argument("--seeds", type=int, default=1000, help="bisects per cell")
    ap.add_argument("--histories", type=int, default=10, help="synthetic histories the seeds share")
    ap.add_argument("--p", type=float, nargs="*", default=[1.0, 0.9, 0.5, 0.3])
    ap.add_argument("--hosts", type=int, nargs="*", default=[1, 2, 3, 7])
    ap.add_argument("--methods", nargs="*", default=["bisect", "repeat3", "bayes"])
    ap.add_argument("--lockstep", action="store_true",
                    help="equal hosts, no jitter, a failed build costs a step: synchronous rounds")
    ap.add_argument("--quick", action="store_true", help="small and fast: a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.commits, args.seeds, args.histories, args.p, args.hosts = 400, 40, 2, [1.0, 0.5], [1, 3]
    t0 = time.time()
    graphs = [history(args.commits, 1000 + k) for k in range(args.histories)]
    m = graphs[0][0].n
    print(f"{args.seeds} bisects per cell; {m} commits, {graphs[0][0].merges} merges in history 0 of "
          f"{args.histories}; ceil(log2 M) = {math.ceil(math.log2(m))}")
    print(f"{'p':>4} {'N':>2} {'method':<8} {'right':>7} {'wrong':>6} {'runs':>6} {'p95':>4} {'rounds':>6} {'p95':>4} "
          f"{'max':>4} {'wall':>6}  bound")
    rows = []
    for p in args.p:
        for n in args.hosts:
            for method in args.methods:
                res = [bisect_once(*graphs[s % len(graphs)], method, p, n, s, args.lockstep) for s in range(args.seeds)]
                row = {"p": p, "N": n, "method": method,
                       "right": sum(r["right"] for r in res) / len(res),
                       "wrong": sum(r["wrong"] for r in res) / len(res),
                       "runs": sum(r["runs"] for r in res) / len(res), "runs95": pct([r["runs"] for r in res], 0.95),
                       "rounds": sum(r["rounds"] for r in res) / len(res),
                       "rounds95": pct([r["rounds"] for r in res], 0.95),
                       "rounds_max": max(r["rounds"] for r in res),
                       "wall": sum(r["wall"] for r in res) / len(res)}
                rows.append(row)
                bound = f"ceil(log{n + 1} M)+1 = {math.ceil(math.log(m, n + 1)) + 1}" if method == "bisect" and p == 1 else ""
                print(f"{p:>4} {n:>2} {method:<8} {row['right']:>7.1%} {row['wrong']:>6.1%} {row['runs']:>6.1f} {row['runs95']:>4} "
                      f"{row['rounds']:>6.1f} {row['rounds95']:>4} {row['rounds_max']:>4} {row['wall']:>6.1f}  {bound}", flush=True)
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
