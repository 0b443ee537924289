"""The power seam's logic: ipmitool's command line carries no password, Redfish requests (a
stand-in HTTP server for the protocol's logic; the real emulator is in the lab tests), a
custom command's output, and the credentials that only come from the environment."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fleetbisect import masking
from fleetbisect.deadline import Deadline
from fleetbisect.errors import UserError
from fleetbisect.power import for_config
from fleetbisect.power.base import PowerAuthError, PowerError
from fleetbisect.power.command import CommandPowerConfig
from fleetbisect.power.ipmi import IpmiConfig, ipmitool_argv
from fleetbisect.power.redfish import RedfishConfig


def test_ipmitool_reads_the_password_from_its_environment_never_argv(monkeypatch):
    cfg = IpmiConfig(kind="ipmi", address="bmc1", user="admin", password_env="BMC1_PW")
    argv = ipmitool_argv(cfg, "chassis", "power", "status")
    assert argv[:3] == ["ipmitool", "-I", "lanplus"] and "-E" in argv and "-P" not in argv
    monkeypatch.delenv("BMC1_PW", raising=False)
    with pytest.raises(UserError, match=r"\$BMC1_PW, which is not set"):
        cfg.password()
    monkeypatch.setenv("BMC1_PW", "pw-0123456789")
    assert cfg.password() == "pw-0123456789"
    assert masking.mask("login pw-0123456789") == "login ***"


class FakeRedfish(BaseHTTPRequestHandler):
    state = {"PowerState": "On", "allowed": ["On", "ForceRestart", "Nmi"], "posts": []}

    def log_message(self, *a):
        pass

    def _auth(self) -> bool:
        ok = self.headers.get("Authorization") == "Basic " + base64.b64encode(b"admin:right-pw").decode()
        if not ok:
            self.send_response(401)
            self.end_headers()
        return ok

    def _json(self, data):
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        if not self._auth():
            return
        if self.path == "/redfish/v1/Systems":
            return self._json({"Members": [{"@odata.id": "/redfish/v1/Systems/box1"}]})
        self._json({"PowerState": self.state["PowerState"], "Actions": {"#ComputerSystem.Reset": {
            "ResetType@Redfish.AllowableValues": self.state["allowed"]}}})

    def do_POST(self):  # noqa: N802
        if not self._auth():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.state["posts"].append((self.path, body["ResetType"]))
        self.send_response(204)
        self.end_headers()


@pytest.fixture
def redfish(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRedfish)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeRedfish.state.update(PowerState="On", allowed=["On", "ForceRestart", "Nmi"], posts=[])
    monkeypatch.setenv("RF_PW", "right-pw")
    yield for_config(RedfishConfig(kind="redfish", url=f"http://127.0.0.1:{server.server_port}",
                                   user="admin", password_env="RF_PW"))
    server.shutdown()


def test_redfish_finds_the_only_system_and_resets_it(redfish):
    d = Deadline.after(10)
    assert redfish.status(d) == "on"
    assert redfish.cycle(d) == "reset (ForceRestart)"
    FakeRedfish.state["allowed"].append("PowerCycle")
    assert redfish.cycle(d) == "reset (PowerCycle)"
    redfish.nmi(d)
    FakeRedfish.state["PowerState"] = "Off"
    assert redfish.cycle(d) == "powered on (it was off)"
    assert [t for _, t in FakeRedfish.state["posts"]] == ["ForceRestart", "PowerCycle", "Nmi", "On"]
    assert {p for p, _ in FakeRedfish.state["posts"]} == {"/redfish/v1/Systems/box1/Actions/ComputerSystem.Reset"}


def test_redfish_wrong_password_is_an_auth_error(redfish, monkeypatch):
    monkeypatch.setenv("RF_PW", "wrong-pw")
    with pytest.raises(PowerAuthError, match=r"refused the login \(HTTP 401\).*\$RF_PW"):
        redfish.check(Deadline.after(10))


def test_command_power_reads_on_or_off():
    on = for_config(CommandPowerConfig(kind="command", status=["echo", "ON"], cycle=["true"]))
    assert on.status(Deadline.after(10)) == "on"
    odd = for_config(CommandPowerConfig(kind="command", status=["echo", "maybe"], cycle=["false"]))
    with pytest.raises(PowerError, match="printed 'maybe'"):
        odd.status(Deadline.after(10))
    with pytest.raises(PowerError, match="exited 1"):
        odd.cycle(Deadline.after(10))
