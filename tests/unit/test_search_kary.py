"""The k-ary search: rounds bound with N hosts, cancel() semantics, rebuild by replay."""

import json
import math
import sys
from pathlib import Path

import pytest

from fleetbisect.errors import UserError
from fleetbisect.search import names, select
from fleetbisect.search.base import Result, Search
from fleetbisect.search.graph import CommitGraph

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import simulate  # noqa: E402


def linear(n):
    return CommitGraph.from_parents({str(i): [str(i - 1)] if i else [] for i in range(n)}, str(n - 1))


def lockstep(graph, culprit, hosts):
    """Synchronous rounds: every idle host gets a cut, then all results come back."""
    s = select("kary")(graph)
    rounds = 0
    while not s.done:
        batch = s.propose(hosts)
        assert batch and len(set(batch)) == len(batch)
        rounds += 1
        for c in batch:
            s.started(c, "h")
        for c in batch:
            s.record(c, Result.BAD if graph.is_ancestor(culprit, graph.index[c]) else Result.GOOD, "h")
    return s, rounds


@pytest.mark.parametrize("shape", ["linear", "merges"])
@pytest.mark.parametrize("hosts", [1, 2, 3, 7])
def test_rounds_bound(shape, hosts):
    graph = linear(300) if shape == "linear" else simulate.history(300, 7)[0]
    m = graph.n
    bound = math.ceil(math.log(m, hosts + 1)) + 1
    for culprit in range(0, m, 7):
        s, rounds = lockstep(graph, culprit, hosts)
        assert s.answer().culprit == graph.commits[culprit]
        assert rounds <= bound, (culprit, rounds, bound)
        if hosts == 1 and shape == "linear":
            assert s.runs <= math.ceil(math.log2(m))


def test_cancel_names_tests_a_result_made_pointless():
    g = linear(100)
    s = select("kary")(g)
    a, b = sorted(s.propose(2), key=g.index.get)
    s.started(a, "h1")
    s.started(b, "h2")
    assert s.cancel() == []  # both still split the candidates
    s.record(a, Result.BAD, "h1")  # the culprit is at or before a: b no longer matters
    assert s.cancel() == [b]
    assert s.in_flight == {} and s.cancel() == []
    left = s.answer().candidates
    s.record(b, Result.GOOD, "h2")  # late (the VM was already done): ignored, not a contradiction
    assert "no longer a candidate" in s.log[-1] and s.answer().candidates == left
    assert b not in s.propose(2)


def test_everything_in_flight_is_cancelled_when_done():
    g = linear(4)
    s = select("kary")(g)
    props = s.propose(3)
    assert len(props) == 3
    for c, h in zip(props, "abc"):
        s.started(c, h)
    s.record(g.commits[0], Result.BAD, "x")  # the first commit of the range is bad: done
    assert s.done and s.answer().culprit == g.commits[0]
    assert sorted(s.cancel()) == sorted(set(props) - {g.commits[0]})


def test_replay_rebuilds_identical_proposals():
    g = simulate.history(500, 3)[0]
    culprit = 211
    s = select("kary")(g)
    for _ in range(3):
        batch = s.propose(3)
        for c in batch:
            s.started(c, "h" + c)
        s.record(batch[0], Result.BAD if g.is_ancestor(culprit, g.index[batch[0]]) else Result.GOOD, "h" + batch[0])
        s.record(batch[-1], Result.SKIP, "h" + batch[-1])
        s.cancel()
    state = json.loads(json.dumps(s.state()))
    again = select(state["search"]).replay(g, state["events"], **state["options"])
    assert again.propose(3) == s.propose(3) and again.in_flight == s.in_flight
    assert again.answer().candidates == s.answer().candidates


def test_unknown_search_lists_the_valid_ones():
    with pytest.raises(UserError, match="valid searches: bayes, kary"):
        select("binary")
    assert names() == ["bayes", "kary"] and all(issubclass(select(n), Search) for n in names())


def test_upcoming_names_the_next_cut_for_either_result():
    g = linear(64)
    s = select("kary")(g)
    (c,) = s.propose(1)
    s.started(c, "h")
    nxt = s.upcoming()
    assert len(nxt) == 2 and c not in nxt
    for result in (Result.BAD, Result.GOOD):  # whichever way c comes back, the next cut was built
        twin = select("kary").replay(g, s.events)
        twin.record(c, result, "h")
        assert twin.propose(1)[0] in nxt
    assert s.in_flight == {c: ["h"]} and s.runs == 0  # asking changed nothing
