"""The power seam: out-of-band control of a bare-metal box (a BMC, a smart PDU), one module per
kind (ipmi, redfish, command), chosen by `kind` in the inventory's `power:` like targets are.

A Power answers `status()` ("on" / "off"), and does `cycle()` (power on when off),
`nmi()` (a diagnostic interrupt: a hung kernel prints its backtrace; PowerUnsupported when the
kind has none) and `check()` (the credentials work: a wrong password is a clear error at
`fleetbisect check`, not at 3 a.m.). Every call takes a Deadline.

Credentials come only from environment variables the inventory names (`password_env`); the
value is registered with the log masker the moment it is read and is never written anywhere,
nor passed on a command line (ipmitool reads it from its environment with -E).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import ClassVar

from pydantic import Field

from ..config.loader import Strict
from ..deadline import Deadline
from ..errors import InfraError, UserError
from .. import masking

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class PowerError(InfraError):
    """The BMC or PDU did not do what was asked (unreachable, an error answer)."""


class PowerAuthError(PowerError):
    """The BMC refused the credentials: a setup mistake only a human fixes."""


class PowerUnsupported(PowerError):
    """This power kind cannot do that (no NMI on a PDU)."""


class Credentials(Strict):
    """A BMC login: the user, and the NAME of the environment variable holding the password."""

    user: str = Field(min_length=1)
    password_env: str = Field(pattern=ENV_NAME, description="environment variable with the password")

    def password(self) -> str:
        value = os.environ.get(self.password_env)
        if value is None:
            raise UserError(f"the BMC password is read from ${self.password_env}, which is not set")
        masking.register({"BMC_PASSWORD": value})  # never in a log, a journal, a report
        return value


class Power(ABC):
    kind: ClassVar[str]

    def __init__(self, config):
        self.config = config

    @abstractmethod
    def describe(self) -> str:
        """Where the power control is, for messages (no secret)."""

    @abstractmethod
    def status(self, deadline: Deadline) -> str:
        """"on" or "off"."""

    @abstractmethod
    def cycle(self, deadline: Deadline) -> str:
        """Power cycle (or power on when off); returns what was done."""

    def nmi(self, deadline: Deadline) -> str:
        raise PowerUnsupported(f"{self.describe()} cannot send an NMI")

    def check(self, deadline: Deadline) -> str:
        """The credentials work and the box's power state reads; returns the state."""
        return f"power is {self.status(deadline)}"
