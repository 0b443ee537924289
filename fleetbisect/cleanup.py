"""Cleanup off the critical path: the VM of a finished attempt is stopped in the background
while the run goes on (the next commit builds and is pushed meanwhile).

The console is still fetched before the step is judged (what the kernel said explains the
outcome); only stopping the VM, and closing that attempt's host connection, move to a thread.
Before anything boots again on the host, before the host's lease is given back, and when the
run ends however it ends (an error, Ctrl-C: `Lab.settle()` in run.py's `finally`), the stop is
awaited. The thread is not a daemon: an interpreter that exits still waits for it, so a VM is
never left running because the controller was quitting.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class Pending:
    """One background stop: `work()` runs in a thread; `wait()` joins it and returns what went
    wrong (None when nothing did) and how long the caller had to wait."""

    def __init__(self, work: Callable[[], None], what: str):
        self.what = what
        self.error: str | None = None
        self.took: float | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"fleetbisect-cleanup {what}")
        self._started = time.monotonic()
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - reported by wait(), never lost in a thread
            self.error = f"{self.what}: {e}"
        finally:
            self.took = time.monotonic() - self._started

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> tuple[str | None, float]:
        t = time.monotonic()
        self._thread.join()
        return self.error, time.monotonic() - t
