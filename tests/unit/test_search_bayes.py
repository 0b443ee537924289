"""The flaky-aware Bayesian search on small seeded cases, its skip groups, replay, calibration."""

import random
import sys
from pathlib import Path

import pytest

from fleetbisect.search import select
from fleetbisect.search.base import Result
from fleetbisect.search.bayes import Calibration
from fleetbisect.search.graph import CommitGraph

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import simulate  # noqa: E402


def linear(n):
    return CommitGraph.from_parents({str(i): [str(i - 1)] if i else [] for i in range(n)}, str(n - 1))


def run(graph, culprit, p, seed, hosts=1, broken=(), **kw):
    rnd = random.Random(seed)
    s = select("bayes")(graph, hit_rate=p, **kw)
    while not s.done:
        batch = s.propose(hosts)
        assert batch, "a search that is not done always has something to test"
        for c in batch:
            s.started(c, "h")
        for c in batch:
            i = graph.index[c]
            if i in broken:
                s.record(c, Result.SKIP, "h")
            else:
                bad = graph.is_ancestor(culprit, i)
                s.record(c, Result.BAD if rnd.random() < (p if bad else 0.001) else Result.GOOD, "h")
    return s, s.answer()


@pytest.mark.parametrize("shape", ["linear", "merges"])
@pytest.mark.parametrize("hosts", [1, 3])
def test_finds_the_culprit_at_p_half_with_the_confidence_asked(shape, hosts):
    graph = linear(200) if shape == "linear" else simulate.history(200, 11)[0]
    right = 0
    for seed in range(20):
        culprit = random.Random(seed).randrange(graph.n)
        s, a = run(graph, culprit, 0.5, seed, hosts)
        assert a.confidence >= 0.99 and a.culprit is not None and a.runner_up and a.runs == s.runs
        right += a.culprit == graph.commits[culprit]
    assert right >= 19


def test_a_culprit_in_an_unbuildable_stretch_leaves_the_stretch_as_candidates():
    g = linear(120)
    s, a = run(g, 50, 0.7, 1, broken=set(range(48, 53)))
    assert a.culprit is None and a.candidates == [g.commits[i] for i in range(48, 54)]
    assert a.confidence >= 0.99


def test_replay_rebuilds_identical_proposals():
    g = simulate.history(300, 5)[0]
    s = select("bayes")(g, hit_rate=0.5)
    rnd = random.Random(3)
    for _ in range(12):
        for c in s.propose(2):
            s.started(c, "h")
            bad = g.is_ancestor(150, g.index[c])
            s.record(c, Result.BAD if bad and rnd.random() < 0.5 else Result.GOOD, "h")
    s.started(s.propose(1)[0], "slow")
    again = select("bayes").replay(g, s.state()["events"], hit_rate=0.5)
    assert again.propose(3) == s.propose(3) and again.log == s.log


def test_the_budget_stops_a_search_without_naming_a_culprit():
    g = linear(1000)
    s, a = run(g, 500, 0.3, 2, budget=10)
    assert s.runs == 10 and a.culprit is None and a.confidence < 0.99
    assert "budget" in a.log[-1]


def test_calibration_interval():
    c = Calibration.from_runs(5, 10)
    assert c.estimate == 0.5 and c.low == pytest.approx(0.2366, abs=1e-3) and c.high == pytest.approx(0.7634, abs=1e-3)
    none = Calibration.from_runs(0, 20)  # false alarms of the good end
    assert none.low == 0 and none.high == pytest.approx(0.1611, abs=1e-3)
    assert "5/10" in str(c)
    with pytest.raises(ValueError):
        Calibration.from_runs(3, 2)
