"""`power: {kind: command}`: custom commands run on the controller (a smart PDU's CLI, a lab
script). Each is an argv list, never a shell line. `status` prints "on" or "off"."""

from __future__ import annotations

import subprocess
from typing import Literal

from pydantic import Field

from ..config.loader import Strict
from ..deadline import Deadline
from .base import Power, PowerError, PowerUnsupported


class CommandPowerConfig(Strict):
    kind: Literal["command"]
    status: list[str] = Field(min_length=1, description="prints on or off")
    cycle: list[str] = Field(min_length=1)
    nmi: list[str] | None = None


class CommandPower(Power):
    kind = "command"
    Config = CommandPowerConfig

    def describe(self) -> str:
        return f"power command {self.config.cycle[0]}"

    def _run(self, argv: list[str], deadline: Deadline) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=max(1.0, deadline.remaining()))
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PowerError(f"`{argv[0]}`: {e}") from None
        if proc.returncode != 0:
            raise PowerError(f"`{argv[0]}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
        return proc.stdout.strip()

    def status(self, deadline: Deadline) -> str:
        out = self._run(self.config.status, deadline).lower()
        if out not in ("on", "off"):
            raise PowerError(f"`{self.config.status[0]}` printed {out!r}, expected on or off")
        return out

    def cycle(self, deadline: Deadline) -> str:
        self._run(self.config.cycle, deadline)
        return "power cycled (command)"

    def nmi(self, deadline: Deadline) -> str:
        if not self.config.nmi:
            raise PowerUnsupported("no `nmi` command in the inventory")
        self._run(self.config.nmi, deadline)
        return "NMI sent (command)"
