"""Notification hooks: shell commands run on start, each verdict, finish and failure.

The event reaches the command in environment variables (FLEETBISECT_EVENT, _RUN_DIR, _HOST,
_COMMIT, _VERDICT, _REASON, _CULPRIT, _MESSAGE), never pasted into the command text, so a
subject line cannot inject anything. A hook that fails or hangs is logged, never fatal. Its
output goes to hooks.log masked; a secret it needs comes from the environment ('$NAME'), since
the command text is kept (masked) in the journal for a resumed run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from .deadline import Deadline
from .localexec import run_logged
from .masking import mask, open_masked, register
from .ui import UI

EVENTS = ("start", "verdict", "finish", "failure")
TIMEOUT = 60


class Hooks:
    def __init__(self, commands: Mapping[str, Sequence[str]], ui: UI, base_env: Mapping[str, str], log: Path):
        self.commands = {k: list(v) for k, v in commands.items() if v}
        self.log = log
        self.ui = ui
        self.base_env = dict(base_env)
        for command in (c for cs in self.commands.values() for c in cs):
            if mask(command) != command:  # the journal keeps it masked: a resume could not run it
                ui.warn(f"a hook command holds a secret's value: it is kept masked, so a resumed run "
                        f"would run {mask(command)!r}; pass the secret as '$NAME' (single quotes)")

    def fire(self, event: str, **values: object) -> None:
        for command in self.commands.get(event, ()):
            env = dict(os.environ)
            env.update({f"FLEETBISECT_{k.upper()}": v for k, v in self.base_env.items()})
            env["FLEETBISECT_EVENT"] = event
            env.update({f"FLEETBISECT_{k.upper()}": "" if v is None else str(v) for k, v in values.items()})
            register(env)
            try:
                with open_masked(self.log, "ab") as log:
                    status = run_logged(["bash", "-c", command], None, env, log, Deadline.after(TIMEOUT))
            except OSError as e:
                self.ui.warn(f"hook for {event} could not run: {e}")
                continue
            if status is None:
                self.ui.warn(f"hook for {event} still running after {TIMEOUT}s, stopped: {command}")
            elif status != 0:
                self.ui.warn(f"hook for {event} exited {status}: {command} (output in {self.log})")
            else:
                self.ui.detail(f"hook for {event} ran: {command}")
