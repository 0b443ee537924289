"""The run's journal: every event appended to `journal.jsonl` and fsync'd before the next action.

A controller that dies (SIGKILL, laptop sleep, reboot) loses at most the event it was writing;
`replay()` rebuilds what was decided from the lines that are whole. A half-written *last* line
is what a crash leaves and is ignored (with a note); a broken line in the middle means someone
edited the file, and is refused with its line number.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .masking import mask_json

JOURNAL = "journal.jsonl"
VERSION = 1


class JournalError(UserError):
    pass


class Journal:
    def __init__(self, run_dir: Path):
        self.path = run_dir / JOURNAL
        self._seq = sum(1 for _ in _lines(self.path)) if self.path.exists() else 0

    def append(self, event: str, **data) -> dict:
        self._seq += 1
        entry = {"seq": self._seq, "time": round(time.time(), 3), "event": event, **data}
        line = json.dumps(mask_json(entry), separators=(",", ":")) + "\n"  # masked, still JSON
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry


def _lines(path: Path):
    with open(path, "rb") as f:
        yield from f


def read(run_dir: Path) -> tuple[list[dict], str | None]:
    """The whole events of a journal, and a note when a torn last line was dropped."""
    path = run_dir / JOURNAL
    if not path.exists():
        raise JournalError(f"{run_dir} is not a fleetbisect run directory (no {JOURNAL})")
    raw = list(_lines(path))
    events, note = [], None
    for n, line in enumerate(raw, 1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or "event" not in entry:
                raise ValueError("not an event")
        except ValueError:
            if n == len(raw):
                note = f"{path}:{n}: dropped a half-written last line (the controller died writing it)"
                break
            raise JournalError(f"{path}:{n}: corrupt journal line (not written by fleetbisect?)")
        events.append(entry)
    return events, note


# Verdicts reused instead of retesting; a confirmation is a deliberate retest, never cached.
CACHED_ROLES = ("bisect", "endpoint-good", "endpoint-bad")


@dataclass
class RunState:
    """What the journal says a run has done: enough to resume it without retesting."""

    config: dict = field(default_factory=dict)
    decided: dict[str, dict] = field(default_factory=dict)  # commit -> step record (verdict)
    marks: list[tuple[str, str]] = field(default_factory=list)  # (commit, verdict) in order
    steps: list[dict] = field(default_factory=list)  # finished step records in order
    interrupted_step: dict | None = None  # a step started and not finished
    finished: dict | None = None


def replay(events: list[dict]) -> RunState:
    state = RunState()
    current = None
    for e in events:
        kind = e["event"]
        if kind == "run-started":
            state.config = e["config"]
        elif kind == "step-started":
            current = e
        elif kind == "step-finished":
            rec = e["record"]
            state.steps.append(rec)
            if rec.get("role", "bisect") in CACHED_ROLES:
                state.decided[rec["commit"]] = rec
            current = None
        elif kind == "marked":
            state.marks.append((e["commit"], e["verdict"]))
        elif kind == "run-finished":
            state.finished = e
    state.interrupted_step = current
    return state
