"""Searches: which commits to test next. Chosen by name; an unknown name lists the valid ones.

- kary: deterministic, git's semantics (one culprit, or the candidate set skips leave); with one
  host it is git's binary search, with N hosts each round cuts the candidates into N+1 parts.
- bayes: flaky-aware Bayesian bisection (a bad kernel may pass by luck; a good one almost never
  fails); stops at the asked confidence or at a budget of runs.

`git bisect` itself (the `bisect` search of one host) is driven by `gitbisect.Bisect`.
"""

from __future__ import annotations

from ..errors import UserError
from .base import Answer, Result, Search
from .graph import CommitGraph


def _registry() -> dict[str, type[Search]]:
    from .bayes import BayesSearch
    from .kary import KarySearch

    return {"kary": KarySearch, "bayes": BayesSearch}


def names() -> list[str]:
    return sorted(_registry())


def select(name: str) -> type[Search]:
    try:
        return _registry()[name]
    except KeyError:
        raise UserError(f"unknown search {name!r}; valid searches: {', '.join(names())}")


__all__ = ["Answer", "CommitGraph", "Result", "Search", "names", "select"]
