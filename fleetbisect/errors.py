"""The error taxonomy: who is at fault decides the exit code and whether a retry can help.

- UserError: the user's input is wrong (inventory, playbook, arguments). Exit 2, nothing touched.
- InfraError: a host, a channel, a disk failed. Retried a bounded number of times, then the run
  aborts (exit 128 for `step`, so `git bisect run` stops instead of marking a wrong verdict).
- Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class FleetbisectError(Exception):
    """Base of every error fleetbisect raises on purpose."""

    exit_code = 1


class UserError(FleetbisectError):
    """Bad input from the user: a clear message, exit 2, no host touched."""

    exit_code = 2


class ConfigError(UserError):
    """One or more problems in a configuration file, each naming file, line and field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class InfraError(FleetbisectError):
    """A host, a connection or a disk failed: never a verdict about the kernel."""

    exit_code = 128


class RunAborted(FleetbisectError):
    """The run cannot go on (retries exhausted, endpoints wrong); the run directory says why."""

    exit_code = 128
