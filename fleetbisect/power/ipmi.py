"""`power: {kind: ipmi}`: a BMC driven with `ipmitool -I lanplus`, exactly as against a real
one. The password reaches ipmitool through its environment (`-E`, IPMI_PASSWORD), never argv."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Literal

from pydantic import Field

from ..config.loader import Int
from ..deadline import Deadline
from .base import Credentials, Power, PowerAuthError, PowerError

AUTH_FAILURES = ("unauthorized name", "rakp", "invalid user name", "password", "authentication",
                 "insufficient privilege", "unable to establish")


class IpmiConfig(Credentials):
    kind: Literal["ipmi"]
    address: str = Field(min_length=1)
    port: int = Int(1, 65535, 623)
    interface: Literal["lanplus", "lan"] = "lanplus"
    ipmitool: str = "ipmitool"


def ipmitool_argv(cfg: IpmiConfig, *args: str) -> list[str]:
    """The command line (a pure function): no password in it."""
    return [cfg.ipmitool, "-I", cfg.interface, "-H", cfg.address, "-p", str(cfg.port), "-U", cfg.user,
            "-E", "-N", "1", "-R", "2", *args]


class Ipmi(Power):
    kind = "ipmi"
    Config = IpmiConfig

    def describe(self) -> str:
        c = self.config
        return f"IPMI BMC {c.address}:{c.port} (user {c.user})"

    def _run(self, deadline: Deadline, *args: str) -> str:
        env = dict(os.environ, IPMI_PASSWORD=self.config.password())
        try:
            proc = subprocess.run(ipmitool_argv(self.config, *args), env=env, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=max(1.0, deadline.remaining()))
        except FileNotFoundError:
            raise PowerError(f"{self.config.ipmitool} is not installed (Debian: apt-get install ipmitool)") from None
        except subprocess.TimeoutExpired:
            raise PowerError(f"{self.describe()}: `ipmitool {' '.join(args)}` got no answer in time") from None
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip()
            if any(w in err.lower() for w in AUTH_FAILURES):
                raise PowerAuthError(f"{self.describe()} refused the login: {err} (check the user and "
                                     f"${self.config.password_env})")
            raise PowerError(f"{self.describe()}: `ipmitool {' '.join(args)}` failed: {err}")
        return proc.stdout.strip()

    def status(self, deadline: Deadline) -> str:
        out = self._run(deadline, "chassis", "power", "status")  # "Chassis Power is on"
        state = out.rsplit(None, 1)[-1].lower() if out else ""
        if state not in ("on", "off"):
            raise PowerError(f"{self.describe()}: unexpected power status {out!r}")
        return state

    def cycle(self, deadline: Deadline) -> str:
        if self.status(deadline) == "off":
            self._run(deadline, "chassis", "power", "on")
            return "powered on (it was off)"
        try:
            self._run(deadline, "chassis", "power", "cycle")
            return "power cycled"
        except PowerAuthError:
            raise
        except PowerError as e:
            if "invalid data field" not in str(e).lower() and "not supported" not in str(e).lower():
                raise
        # Some BMCs (virtualbmc among them) have no `cycle`: off, then on once it reads off.
        self._run(deadline, "chassis", "power", "off")
        while self.status(deadline) != "off":
            if deadline.expired:
                raise PowerError(f"{self.describe()}: the box did not power off")
            time.sleep(0.5)
        while True:  # a BMC may refuse `on` while the machine is still settling after `off`
            try:
                self._run(deadline, "chassis", "power", "on")
                return "power cycled (off, on: the BMC has no `cycle`)"
            except PowerAuthError:
                raise
            except PowerError:
                if self.status(deadline) == "on":
                    return "power cycled (off, on: the BMC has no `cycle`)"
                if deadline.expired:
                    raise
                time.sleep(1.0)

    def nmi(self, deadline: Deadline) -> str:
        self._run(deadline, "chassis", "power", "diag")
        return "NMI sent (chassis power diag)"
