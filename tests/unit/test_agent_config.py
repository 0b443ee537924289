"""`reach: agent` in the inventory: what it requires, and what the qemu target makes of it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from fleetbisect.config.inventory import load_inventory
from fleetbisect.errors import ConfigError
from fleetbisect.targets.qemu import Qemu, VMPaths, qemu_argv

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9 guest"


def inventory(tmp_path: Path, guest: str) -> Path:
    path = tmp_path / "inv.yaml"
    path.write_text(f"""\
hosts:
  vmhost:
    ssh: {{address: 127.0.0.1}}
    work_dir: /srv/fb
    target:
      kind: qemu
      guest: {guest}
""")
    return path


def test_a_guest_reached_through_the_agent_needs_no_port_and_no_host_key(tmp_path):
    host = load_inventory([inventory(tmp_path, "{reach: agent}")]).host("vmhost")
    g = host.target.guest
    assert g.reach == "agent" and g.has_agent and g.port is None and g.host_key is None
    boot = SimpleNamespace(memory=512, cpus=1, cmdline="console=ttyS0", root=None, qemu_args=[])
    argv = qemu_argv(host.target, boot, kernel="k", initrd=None, paths=VMPaths.under(host.work_dir))
    assert "socket,path=/srv/fb/vm/qga.sock,server=on,wait=off,id=qga0" in argv
    assert "user,id=n0" in argv
    target = Qemu(host, SimpleNamespace())
    assert target.reached_by == "the guest agent"
    assert target.probe(None) is True  # the login attempt is the probe (no SSH banner to wait for)


def test_an_ssh_guest_may_also_get_the_agent_channel(tmp_path):
    host = load_inventory([inventory(tmp_path, f"{{port: 10022, host_key: {KEY}, agent: true}}")]).host("vmhost")
    assert host.target.guest.reach == "ssh" and host.target.guest.has_agent
    assert Qemu(host, SimpleNamespace()).reached_by == "SSH"


@pytest.mark.parametrize("guest, field", [("{reach: ssh, host_key: KEY}", "port"), ("{port: 10022}", "host_key")])
def test_an_ssh_guest_still_needs_its_port_and_host_key(tmp_path, guest, field):
    with pytest.raises(ConfigError) as e:
        load_inventory([inventory(tmp_path, guest.replace("KEY", KEY))])
    (problem,) = e.value.problems
    assert f"hosts.vmhost.target.guest.{field}: required when the guest is reached by SSH" in str(problem)
    assert str(problem).startswith(f"{tmp_path / 'inv.yaml'}:7 ")


@pytest.mark.parametrize("guest", ["{reach: telnet}", "{reach: agent, agent: 1}"])
def test_bad_reach_values_are_named(tmp_path, guest):
    with pytest.raises(ConfigError) as e:
        load_inventory([inventory(tmp_path, guest)])
    assert any("hosts.vmhost.target.guest." in str(p) for p in e.value.problems)
