"""One executor per host: a thread that runs the steps it is handed on its host, one at a time.

The executor holds the host's lease for the whole run, builds in a git worktree of its own
(sharing the repo's object store) and calls the existing step code (`step.run_step`); it knows
nothing of searches. The controller (fleet.py) hands it tasks and reads results from one queue.

A task can be cancelled while it runs (its result no longer matters): the step stops at its
next stage (the lease check of each stage raises `StepCancelled`) and the VM is stopped at once
over a connection of its own, so the host is free for other work within seconds; the host's
lease is kept.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from .config.inventory import path_name
from .deadline import Deadline
from .errors import RunAborted
from .lease import LeaseLost
from .remote.base import RemoteError
from .search.gitbisect import git
from .step import Lab, StepRecord, connect_host, run_step
from . import targets


class StepCancelled(LeaseLost):
    """Raised at a stage boundary of a cancelled step. A LeaseLost for step.py (it stops the
    step and is never retried), but the lease is still held: the cleanup stops the VM."""


@dataclass
class Task:
    index: int
    commit: str
    subject: str
    role: str  # bisect | run | endpoint-good | endpoint-bad | calibrate-bad | calibrate-good | confirm-*
    cancelled: bool = False


@dataclass
class Done:
    """What an executor reports: a record, or why the host cannot go on (`error`)."""

    host: str
    task: Task | None
    record: StepRecord | None = None
    error: str | None = None  # the host is gone for this run (unreachable, lease lost)


class _Guard:
    """The step's view of the lease: the host's keeper, plus this task's cancellation."""

    def __init__(self, keeper, task: Task):
        self.keeper, self.task = keeper, task

    @property
    def lost(self) -> bool:
        return bool(self.keeper.lost)

    def check(self) -> None:
        self.keeper.check()
        if self.task.cancelled:
            raise StepCancelled(f"step {self.task.index} was cancelled: its result no longer matters")


class Executor:
    def __init__(self, host_cfg, playbook, repo: Path, run_dir: Path, run_id: str, token: str, ui,
                 results: "queue.Queue[Done]", *, leased, build=None):
        self.host, self.playbook, self.repo, self.run_dir = host_cfg, playbook, repo, run_dir
        self.name = host_cfg.name
        self.run_id, self.token, self.ui, self.results = run_id, token, ui, results
        self.tree = run_dir / "worktrees" / path_name(self.name)
        self.inbox: "queue.Queue[Task | None]" = queue.Queue()
        self.current: Task | None = None
        self._leased = leased
        self._build = build  # the run's build stage (its cache), shared by every host's executor
        self._thread = threading.Thread(target=self._main, name=f"executor-{self.name}", daemon=True)
        self.lab: Lab | None = None

    def start(self) -> "Executor":
        self._thread.start()
        return self

    def give(self, task: Task) -> None:
        self.current = task
        self.inbox.put(task)

    def cancel(self) -> None:
        """Stop the task in flight: at its next stage, and its VM now (in the background)."""
        task = self.current
        if task is None or task.cancelled:
            return
        task.cancelled = True
        threading.Thread(target=self._stop_vm, name=f"cancel-{self.name}", daemon=True).start()

    def stop(self, timeout: float | None = None) -> None:
        self.inbox.put(None)
        self._thread.join(timeout)

    # -- the thread -----------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            with self._leased(self.host, self.run_id, self.playbook.policy.retries, self.ui, self.token) as keeper:
                self._worktree()
                # a finished step's VM stops while the next one builds and pushes (cleanup.py)
                self.lab = Lab(self.tree, self.host, self.playbook, self.ui, lease=keeper,
                               background_cleanup=True, **({"build": self._build} if self._build else {}))
                try:
                    while True:
                        task = self.inbox.get()
                        if task is None:
                            return
                        self.results.put(self._run(task, keeper))
                finally:
                    self.lab.settle()  # the last VM is stopped before the lease goes back
        except RunAborted as e:  # never reached: nothing was tested
            self.results.put(Done(self.name, self.current, error=str(e)))
        except BaseException as e:  # noqa: BLE001 - the controller decides; a bug is never a verdict
            self.results.put(Done(self.name, self.current, error=f"{type(e).__name__}: {e}"))
        finally:
            git(self.repo, "worktree", "remove", "--force", str(self.tree), check=False)

    def _run(self, task: Task, keeper) -> Done:
        git(self.tree, "checkout", "--quiet", "--detach", task.commit)
        lab = self.lab
        lab.lease = _Guard(keeper, task)
        step_dir = self.run_dir / "steps" / f"{task.index:03d}-{task.commit[:12]}"
        try:
            record = run_step(lab, task.index, task.commit, task.subject, step_dir, task.role)
        except StepCancelled:
            return Done(self.name, task)  # no record: nothing was learnt
        except LeaseLost as e:
            return Done(self.name, task, error=f"lost the lease of {self.name}: {e}")
        if keeper.lost:  # a verdict from a step that lost the host on the way is not used
            return Done(self.name, task, error=f"lost the lease of {self.name}: {keeper.lost}")
        return Done(self.name, task, record)

    def _worktree(self) -> None:
        if (self.tree / ".git").exists():  # ours, left by a controller that died
            git(self.tree, "reset", "--hard", "--quiet")
            git(self.tree, "clean", "-fd", "--quiet")
            return
        self.tree.parent.mkdir(parents=True, exist_ok=True)
        git(self.repo, "worktree", "prune", check=False)
        git(self.repo, "worktree", "add", "--detach", "--force", str(self.tree), "HEAD")

    def _stop_vm(self) -> None:
        """The cancelled step's VM, stopped over a connection of its own (the step's own is busy)."""
        try:
            conn = connect_host(self.host, Deadline.after(self.host.ssh.connect_timeout + 5))
        except RemoteError as e:
            self.ui.warn(f"{self.name}: could not reach the host to stop a cancelled step's VM: {e}")
            return
        try:
            targets.for_host(self.host, self.playbook).stop(conn, Deadline.after(60))
        except Exception as e:  # noqa: BLE001 - the step's own cleanup stops it too
            self.ui.detail(f"{self.name}: stopping the cancelled step's VM: {e}")
        finally:
            conn.close()
