"""`power: {kind: redfish}`: a BMC's Redfish service, plain HTTP(S) requests as against a real
one: the system's PowerState, and ComputerSystem.Reset (ForceRestart/PowerCycle, On, Nmi).
TLS is verified unless the inventory says otherwise (`ca_file` for a BMC's own CA)."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from typing import Literal

from pydantic import Field

from ..config.loader import StrictBool
from ..deadline import Deadline
from .base import Credentials, Power, PowerAuthError, PowerError


class RedfishConfig(Credentials):
    kind: Literal["redfish"]
    url: str = Field(pattern=r"^https?://[^/\s]+/?$", description="the BMC's base URL, https://bmc.example")
    system: str | None = Field(None, description="the ComputerSystem's id; default: the only one")
    verify_tls: StrictBool = True
    ca_file: str | None = None


class Redfish(Power):
    kind = "redfish"
    Config = RedfishConfig

    def __init__(self, config):
        super().__init__(config)
        self._system: str | None = None

    def describe(self) -> str:
        return f"Redfish BMC {self.config.url.rstrip('/')} (user {self.config.user})"

    def _request(self, method: str, path: str, deadline: Deadline, body: dict | None = None) -> dict:
        c = self.config
        token = base64.b64encode(f"{c.user}:{c.password()}".encode()).decode()
        req = urllib.request.Request(c.url.rstrip("/") + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Basic {token}", "Accept": "application/json",
                                              "Content-Type": "application/json"})
        ctx = None
        if c.url.startswith("https"):
            ctx = ssl.create_default_context(cafile=c.ca_file)
            if not c.verify_tls:
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            with urllib.request.urlopen(req, timeout=max(1.0, deadline.remaining()), context=ctx) as resp:
                text = resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise PowerAuthError(f"{self.describe()} refused the login (HTTP {e.code}): check the user and "
                                     f"${c.password_env}") from None
            detail = e.read().decode("utf-8", "replace")[:300]
            raise PowerError(f"{self.describe()}: {method} {path}: HTTP {e.code} {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise PowerError(f"{self.describe()}: {method} {path}: {getattr(e, 'reason', e)}") from None
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            raise PowerError(f"{self.describe()}: {method} {path}: not JSON: {text[:200]!r}") from None

    def _system_path(self, deadline: Deadline) -> str:
        if self._system is None:
            if self.config.system:
                self._system = f"/redfish/v1/Systems/{self.config.system}"
            else:
                members = self._request("GET", "/redfish/v1/Systems", deadline).get("Members", [])
                if len(members) != 1:
                    raise PowerError(f"{self.describe()} has {len(members)} systems: name one with `system:`")
                self._system = members[0]["@odata.id"].rstrip("/")
        return self._system

    def status(self, deadline: Deadline) -> str:
        state = self._request("GET", self._system_path(deadline), deadline).get("PowerState")
        if state not in ("On", "Off", "PoweringOn", "PoweringOff"):
            raise PowerError(f"{self.describe()}: unexpected PowerState {state!r}")
        return "on" if state in ("On", "PoweringOff") else "off"

    def _reset(self, kind: str, deadline: Deadline) -> None:
        path = self._system_path(deadline) + "/Actions/ComputerSystem.Reset"
        self._request("POST", path, deadline, {"ResetType": kind})

    def _allowed(self, deadline: Deadline) -> list[str]:
        system = self._request("GET", self._system_path(deadline), deadline)
        action = system.get("Actions", {}).get("#ComputerSystem.Reset", {})
        return list(action.get("ResetType@Redfish.AllowableValues", []))

    def cycle(self, deadline: Deadline) -> str:
        if self.status(deadline) == "off":
            self._reset("On", deadline)
            return "powered on (it was off)"
        allowed = self._allowed(deadline)
        kind = "PowerCycle" if "PowerCycle" in allowed else "ForceRestart"
        self._reset(kind, deadline)
        return f"reset ({kind})"

    def nmi(self, deadline: Deadline) -> str:
        self._reset("Nmi", deadline)
        return "NMI sent (Reset Nmi)"
