"""The Search interface: which commits to test next, given every result so far.

A search is owned by the run's controller and fed by executors, one per host:

    search = select("kary")(graph)            # or select("bayes")(graph, hit_rate=0.5)
    while not search.done:
        for commit in search.cancel():        # in flight, but its result can no longer matter
            stop that host's VM; the host is idle again
        for commit in search.propose(len(idle)):
            search.started(commit, host); hand the step to that host's executor
        ... an executor finishes:  search.record(commit, Result.BAD, host)
    answer = search.answer()

A search's state is the list of events it was given (`events`), in order: `replay(graph,
events)` rebuilds an identical search, so the run's journal only has to hold what happened
(started / record / cancel), and a resumed run proposes exactly what the dead one would have.
`propose` is a pure function of that state; it does not mark anything as started.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable

from .graph import CommitGraph


class Result(str, enum.Enum):
    """What one test of one commit told the search. For the flaky search, BAD is "the
    reproducer failed on this boot" and GOOD "it passed" (an observation, not a verdict)."""

    GOOD = "good"
    BAD = "bad"
    SKIP = "skip"  # could not be tested (build failed, ...): never proposed again


@dataclass
class Answer:
    culprit: str | None  # the first bad commit, when one is named
    candidates: list[str]  # the smallest set left when skips make it ambiguous ([culprit] when named)
    confidence: float  # probability the answer is right under the search's model; 1.0 when deterministic
    runner_up: str | None
    runs: int  # results recorded (good, bad and skip)
    log: list[str] = field(default_factory=list)  # human lines for the report, in order

    def to_json(self) -> dict:
        return {"culprit": self.culprit, "candidates": list(self.candidates), "confidence": self.confidence,
                "runner_up": self.runner_up, "runs": self.runs, "log": list(self.log)}


class Search(ABC):
    name = "search"

    def __init__(self, graph: CommitGraph, **options):
        self.graph = graph
        self.options = dict(options)
        self.events: list[tuple] = []  # ("started", c, host) | ("record", c, result, host) | ("cancel", c)
        # | ("withdraw", c, host)
        self.in_flight: dict[str, list[str]] = {}  # commit -> hosts testing it
        self.runs = 0
        self.log: list[str] = []

    # -- what the controller calls --------------------------------------------------------------
    @abstractmethod
    def propose(self, idle_hosts: int) -> list[str]:
        """Up to `idle_hosts` commits to test next (maybe fewer, maybe none)."""

    def started(self, commit: str, host: str) -> None:
        self._check(commit)
        self.events.append(("started", commit, host))
        self.in_flight.setdefault(commit, []).append(host)

    def record(self, commit: str, result: Result | str, host: str | None = None) -> None:
        self._check(commit)
        result = Result(result)
        self.events.append(("record", commit, result.value, host))
        hosts = self.in_flight.get(commit, [])
        if host in hosts:
            hosts.remove(host)
        elif hosts:
            hosts.pop(0)
        if not hosts:
            self.in_flight.pop(commit, None)
        self.runs += 1
        self._record(self.graph.index[commit], result, host)

    def cancel(self) -> list[str]:
        """In-flight commits whose result can no longer change anything, one entry per host
        testing it. They are no longer in flight once returned: give those hosts other work."""
        out = []
        for commit in self._pointless():
            hosts = self.in_flight.pop(commit, [])
            out += [commit] * len(hosts)
            self.events.append(("cancel", commit))
            self.log.append(f"cancel {commit[:12]} on {', '.join(h or '?' for h in hosts)}: its result no longer matters")
        return out

    def withdraw(self, commit: str, host: str) -> None:
        """`host` will not report on `commit` (it was set aside, or the step could not run): the
        commit is no longer in flight there, and nothing was learnt."""
        self.events.append(("withdraw", commit, host))
        hosts = self.in_flight.get(commit, [])
        if host in hosts:
            hosts.remove(host)
        if not hosts:
            self.in_flight.pop(commit, None)

    def upcoming(self, limit: int = 4) -> list[str]:
        """Commits the search may ask for once the tests in flight come back, either way: what a
        build-ahead can build now so that no host waits for a build. Not in flight, no repeats."""
        out: list[str] = []
        for commit, hosts in list(self.in_flight.items()):
            for result in (Result.BAD, Result.GOOD):
                twin = type(self).replay(self.graph, self.events, **self.options)
                twin.record(commit, result, hosts[0])
                for c in twin.propose(1):
                    if c not in out and c not in self.in_flight:
                        out.append(c)
        return out[:limit]

    @property
    @abstractmethod
    def done(self) -> bool: ...

    @abstractmethod
    def answer(self) -> Answer: ...

    # -- resume ---------------------------------------------------------------------------------
    @classmethod
    def replay(cls, graph: CommitGraph, events: Iterable[Iterable], **options) -> "Search":
        """A search rebuilt from its events (e.g. from the run's journal), in order."""
        s = cls(graph, **options)
        for ev in events:
            kind, *args = ev
            if kind == "started":
                s.started(args[0], args[1])
            elif kind == "record":
                s.record(args[0], args[1], args[2] if len(args) > 2 else None)
            elif kind == "withdraw":
                s.withdraw(args[0], args[1])
            elif kind == "cancel":
                s.in_flight.pop(args[0], None)
                s.events.append(("cancel", args[0]))
            else:
                raise ValueError(f"unknown search event {kind!r}")
        return s

    def state(self) -> dict:
        """JSON-serialisable state: the options and the events that rebuild the search."""
        return {"search": self.name, "options": self.options, "events": [list(e) for e in self.events]}

    # -- for subclasses -------------------------------------------------------------------------
    @abstractmethod
    def _record(self, i: int, result: Result, host: str | None) -> None: ...

    def _pointless(self) -> list[str]:
        return []

    def _check(self, commit: str) -> None:
        if commit not in self.graph.index:
            raise ValueError(f"{commit} is not in the search's range")
