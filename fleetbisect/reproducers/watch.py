"""Stall detection: a transfer (or a command's output) that makes no progress for `stall`
seconds is a hang at once; the reproducer's `timeout` stays the outer bound.

    with Watch(stall=5, deadline=Deadline.after(120), on_stall=guest.abort) as watch:
        guest.put_stream(..., progress=watch.progress)
    watch.stalled, watch.timed_out, watch.evidence()

A `Watch` keeps bytes-over-time samples (seconds since it started, bytes moved), thinned to
about one every SAMPLE_EVERY seconds plus every sample where progress resumed or stopped, so
the evidence shows where a copy stopped. A thread checks every TICK seconds whether the last
progress is older than `stall`, or the deadline passed; then it calls `on_stall(reason)` once
(which must make the blocked transfer raise: cut the connection, kill the process).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..deadline import Deadline

TICK = 0.05
SAMPLE_EVERY = 0.25
MAX_SAMPLES = 4000  # a 2-minute copy at one sample per 0.25 s is 480


class Watch:
    def __init__(self, stall: float | None, on_stall: Callable[[str], None] = lambda reason: None,
                 clock: Callable[[], float] = time.monotonic, deadline: Deadline | None = None):
        self.stall = stall
        self.deadline = deadline
        self.timed_out = False
        self.on_stall = on_stall
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.last_progress = self.started  # clock() when `done` last grew (or the start)
        self.stalled_at: float | None = None
        self.samples: list[tuple[float, int]] = [(0.0, 0)]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # progress --------------------------------------------------------------------------

    def progress(self, done: int) -> None:
        """`done` bytes (or output characters) moved so far; a Progress callback."""
        now = self.clock()
        with self._lock:
            if done <= self.done:
                return
            resumed = now - self.last_progress >= SAMPLE_EVERY
            if resumed and self.samples[-1][1] != self.done:
                # progress had paused: keep where it paused, so the flat stretch shows
                self._sample(self.last_progress, self.done)
            self.done = done
            self.last_progress = now
            if resumed or now - self.started - self.samples[-1][0] >= SAMPLE_EVERY:
                self._sample(now, done)

    def _sample(self, at: float, done: int) -> None:
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append((round(at - self.started, 3), done))

    @property
    def stalled(self) -> bool:
        return self.stalled_at is not None

    def idle(self) -> float:
        """Seconds since the last progress."""
        return self.clock() - self.last_progress

    def check(self) -> bool:
        """True (once) when no progress came for `stall` seconds, or the deadline passed; then
        `on_stall(reason)` was called."""
        with self._lock:
            if self.stalled_at is not None or self.timed_out:
                return False
            now = self.clock()
            if self.stall is not None and now - self.last_progress >= self.stall:
                self.stalled_at = now
                reason = f"no progress for {self.stall:g}s after {self.done} bytes"
            elif self.deadline is not None and self.deadline.expired:
                self.timed_out = True
                reason = f"still running at its {self.deadline.seconds:g}s deadline"
            else:
                return False
        self.on_stall(reason)
        return True

    # the watcher thread ----------------------------------------------------------------

    def __enter__(self) -> "Watch":
        if self.stall is not None or self.deadline is not None:
            self._thread = threading.Thread(target=self._run, name="fleetbisect-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.samples[-1][1] != self.done:
                self._sample(self.last_progress, self.done)

    def _run(self) -> None:
        while not self._stop.wait(TICK):
            if self.check():
                return

    # evidence --------------------------------------------------------------------------

    def evidence(self) -> dict:
        """What the outcome and the log keep: the samples, when the last byte moved, and when
        the stall was declared (seconds since the start)."""
        out = {
            "bytes": self.done,
            "last_progress_s": round(self.last_progress - self.started, 3),
            "samples": [list(s) for s in self.samples],
        }
        if self.stalled_at is not None:
            out["stalled_at_s"] = round(self.stalled_at - self.started, 3)
            out["stall_s"] = self.stall
        return out
