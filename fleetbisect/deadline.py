"""Deadlines, passed down instead of durations (as LAVA does).

A stage gets a Deadline; everything it calls takes `deadline.remaining()` or a sub-deadline
with `deadline.sub(seconds)`, so nothing can outlive the stage that started it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


class DeadlineExceeded(Exception):
    """Raised by Deadline.check(); carries what was being waited for."""

    def __init__(self, what: str, seconds: float):
        self.what = what
        self.seconds = seconds
        super().__init__(f"{what}: no result within {seconds:.1f}s")


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic() value
    seconds: float  # the budget it was created with, for messages

    @classmethod
    def after(cls, seconds: float) -> "Deadline":
        return cls(time.monotonic() + seconds, seconds)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def sub(self, seconds: float) -> "Deadline":
        """A deadline no later than this one and no later than `seconds` from now."""
        at = min(self.at, time.monotonic() + seconds)
        return Deadline(at, min(seconds, self.seconds))

    def check(self, what: str) -> None:
        if self.expired:
            raise DeadlineExceeded(what, self.seconds)
