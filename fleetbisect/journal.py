"""The run's journal: every event appended to `journal.jsonl` and fsync'd before the next action.

A controller that dies (SIGKILL, laptop sleep, reboot) loses at most the event it was writing;
`replay()` rebuilds what was decided from the lines that are whole. A half-written *last* line
is what a crash leaves: `read()` ignores it (with a note), and the next controller that opens
the journal to write (`Journal(...)`) cuts it off, so its first event does not glue onto it. A
broken line in the middle means someone edited the file, and is refused with its line number.

One controller per run directory: `RunLock` holds `controller.lock` with flock(2) for the
controller's lifetime. The kernel drops it when the process dies, however it dies, so a dead
controller's lock is taken over without asking, and a live one's is refused with who holds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UserError
from .masking import mask_json

JOURNAL = "journal.jsonl"
LOCK = "controller.lock"
VERSION = 1


class JournalError(UserError):
    pass


class Journal:
    """The writer's view of the journal. `guard`, when set, is called before every append: a
    controller that lost the right to decide (its host lease) raises there instead of recording."""

    def __init__(self, run_dir: Path, guard: Callable[[], None] | None = None):
        self.path = run_dir / JOURNAL
        self.guard = guard
        self.note = _repair(self.path) if self.path.exists() else None
        self._seq = sum(1 for _ in _lines(self.path)) if self.path.exists() else 0

    def append(self, event: str, **data) -> dict:
        if self.guard is not None:
            self.guard()
        self._seq += 1
        entry = {"seq": self._seq, "time": round(time.time(), 3), "event": event, **data}
        line = (json.dumps(mask_json(entry), separators=(",", ":")) + "\n").encode()  # masked, still JSON
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a signal, a nearly full disk): write the rest."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _event(line: bytes) -> dict | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and "event" in entry else None


def _repair(path: Path) -> str | None:
    """Cut a torn last line back to the last whole event (or end a whole one that lost only its
    newline), so that the next append starts a line of its own. Returns a note, or None."""
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return None
        start = data.rfind(b"\n") + 1
        n = data.count(b"\n") + 1
        if _event(data[start:]) is not None:
            f.write(b"\n")
            note = f"{path}:{n}: the last event had lost its newline; ended it"
        else:
            f.truncate(start)
            note = (f"{path}:{n}: cut a half-written last line ({len(data) - start} bytes; the "
                    "controller died writing it)")
        f.flush()
        os.fsync(f.fileno())
    return note


def _lines(path: Path):
    with open(path, "rb") as f:
        yield from f


def read(run_dir: Path) -> tuple[list[dict], str | None]:
    """The whole events of a journal, and a note when a torn last line was dropped. Read-only:
    `status` reads the journal of a live controller, which may be writing its last line."""
    path = run_dir / JOURNAL
    if not path.exists():
        raise JournalError(f"{run_dir} is not a fleetbisect run directory (no {JOURNAL})")
    raw = list(_lines(path))
    events, note = [], None
    for n, line in enumerate(raw, 1):
        entry = _event(line)
        if entry is None:
            if n == len(raw):
                note = f"{path}:{n}: dropped a half-written last line (the controller died writing it)"
                break
            raise JournalError(f"{path}:{n}: corrupt journal line (not written by fleetbisect?)")
        events.append(entry)
    return events, note


class RunLocked(UserError):
    pass


class RunLock:
    """`controller.lock` in the run directory, held (flock) while a controller drives the run.
    Its content says who holds it, for the message a second controller gets and for `status`."""

    def __init__(self, run_dir: Path, holder: dict):
        self.path = run_dir / LOCK
        self.holder = holder
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
        # `status` probes the lock for an instant: try for a moment before calling it held.
        for _ in range(20):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                time.sleep(0.05)
        else:
            os.close(fd)
            h = holder_of(self.path.parent) or {}
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"])) if h.get("since") else "?"
            raise RunLocked(
                f"{self.path.parent} is driven by a live controller (pid {h.get('pid', '?')} on "
                f"{h.get('host', '?')}, since {since}): only one controller may drive a run. "
                f"`fleetbisect status {self.path.parent}` shows where it is; stop that one first "
                "to take the run over"
            )
        self._fd = fd
        os.ftruncate(fd, 0)
        _write_all(fd, (json.dumps({**self.holder, "since": round(time.time(), 3)}) + "\n").encode())
        os.fsync(fd)
        return self

    def heartbeat(self) -> None:
        """Touch the lock file: `status` on another machine (a shared run directory) reads its
        age as the time since the controller last renewed its host lease."""
        if self._fd is not None:
            os.utime(self._fd)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the flock; the file stays (removing it would race)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_of(run_dir: Path) -> dict | None:
    """Who holds (or last held) the run directory's lock, from its content."""
    try:
        data = json.loads((run_dir / LOCK).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def lock_is_held(run_dir: Path) -> bool | None:
    """True when a live process on this machine holds the run's lock; None when there is no lock
    file. (flock is local to this machine unless the run directory is on a shared filesystem.)"""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)  # drops the probe's shared lock at once
    return False


# Verdicts reused instead of retesting; a confirmation is a deliberate retest, never cached.
CACHED_ROLES = ("bisect", "endpoint-good", "endpoint-bad")
# A run that ended with one of these has its answer: `resume` reports it instead of driving on.
# ("aborted" is not final: once the cause is fixed, `resume` continues the run.)
FINAL_STATUSES = ("found", "unconfirmed", "inconclusive", "endpoint-failed", "setup-error")


@dataclass
class RunState:
    """What the journal says a run has done: enough to resume it without retesting."""

    config: dict = field(default_factory=dict)
    decided: dict[str, dict] = field(default_factory=dict)  # commit -> step record (verdict)
    marks: list[tuple[str, str]] = field(default_factory=list)  # (commit, verdict) in order
    steps: list[dict] = field(default_factory=list)  # finished step records in order
    interrupted_step: dict | None = None  # a step started and not finished (the last one)
    finished: dict | None = None  # the run-finished event, unless the run was resumed after it
    # Several hosts: the steps started and not finished (index -> step-started event, with its
    # host), the hosts set aside (host -> why), and the highest step index used so far.
    in_flight: dict[int, dict] = field(default_factory=dict)
    set_aside: dict[str, str] = field(default_factory=dict)
    last_index: int = 0

    @property
    def final(self) -> bool:
        return bool(self.finished) and self.finished.get("status") in FINAL_STATUSES


def replay(events: list[dict]) -> RunState:
    state = RunState()
    current = None
    for e in events:
        kind = e["event"]
        if kind == "run-started":
            state.config = e["config"]
        elif kind == "step-started":
            current = e
            state.in_flight[e.get("index", 0)] = e
            state.last_index = max(state.last_index, e.get("index", 0))
        elif kind == "step-finished":
            rec = e["record"] if "host" not in e else {**e["record"], "host": e["host"]}
            state.steps.append(rec)
            if rec.get("role", "bisect") in CACHED_ROLES:
                state.decided[rec["commit"]] = rec
            state.in_flight.pop(rec.get("index"), None)
            current = None
        elif kind == "step-cancelled":  # its result no longer mattered: nothing was learnt
            state.in_flight.pop(e.get("index"), None)
            current = None
        elif kind == "host-set-aside":
            state.set_aside[e["host"]] = e.get("reason", "")
        elif kind == "marked":
            state.marks.append((e["commit"], e["verdict"]))
        elif kind == "run-finished":
            state.finished = e
        elif kind == "resumed":  # an aborted run taken up again is not finished any more
            state.finished = None
            state.in_flight.clear()  # the dead controller's steps in flight are tested again
            state.set_aside.clear()  # a new controller gives every host another chance
    state.interrupted_step = current or (list(state.in_flight.values())[-1] if state.in_flight else None)
    return state
