"""Inventory and playbook loading: every problem names file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetbisect.config.inventory import load_inventory
from fleetbisect.config.loader import parse_bytes, parse_seconds
from fleetbisect.config.playbook import load_playbook
from fleetbisect.errors import ConfigError, UserError
from fleetbisect.lab.demo import lab_playbook
from fleetbisect.verdict import OutcomeKind

ROOT = Path(__file__).resolve().parents[2]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9 guest"

INVENTORY = f"""\
hosts:
  prime-radiant:
    ssh:
      address: 127.0.0.1
      port: 2222
      user: bisect
      connect_timeout: 5s
    work_dir: /var/tmp/fb
    target:
      kind: qemu
      accel: tcg
      guest:
        port: 10022
        via: direct
        host_key: {KEY}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(fn, *args) -> list[str]:
    with pytest.raises(ConfigError) as e:
        fn(*args)
    return e.value.problems


@pytest.mark.parametrize("text,seconds", [(30, 30.0), ("30s", 30.0), ("1.5m", 90.0), ("2h", 7200.0), ("1m30s", 90.0)])
def test_durations(text, seconds):
    assert parse_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-3s", "0", "5 parsecs", True])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_seconds(text)


@pytest.mark.parametrize("text,size", [(4096, 4096), ("64K", 65536), ("8M", 8 << 20), ("8MiB", 8 << 20), ("1G", 1 << 30)])
def test_sizes(text, size):
    assert parse_bytes(text) == size


def test_the_shipped_files_load():
    pb = load_playbook(ROOT / "playbooks" / "scp-stress.yaml")
    assert pb.reproducers[0].kind == "scp-stress" and pb.reproducers[0].size == 1 << 30
    assert pb.reproducers[0].iterations == 15 and pb.reproducers[0].timeout == 120.0
    assert len(pb.digest) == 64
    lab = load_playbook(lab_playbook())
    assert set(lab.artifacts) == {"kernel", "initrd"}
    # The example inventory names key files the user creates; only its shape is checked here.
    with pytest.raises(ConfigError) as e:
        load_inventory([ROOT / "inventory"])
    assert all(p.field in ("hosts.prime-radiant.target.guest.host_key", "hosts.prime-radiant.target.guest.key")
               for p in e.value.problems), e.value.problems


def test_inventory_loads_and_builds_ssh_params(tmp_path):
    inv = load_inventory([write(tmp_path, "lab.yaml", INVENTORY)])
    host = inv.host("prime-radiant")
    p = host.ssh_params()
    assert (p.host, p.port, p.user, p.connect_timeout) == ("127.0.0.1", 2222, "bisect", 5.0)
    g = host.target.guest_ssh_params(host.name)
    assert g.host_keys == (KEY,) and g.port == 10022 and g.name == "prime-radiant/guest"


def test_unknown_host_lists_the_known_ones(tmp_path):
    inv = load_inventory([write(tmp_path, "lab.yaml", INVENTORY)])
    with pytest.raises(UserError, match="unknown host 'nope'.*prime-radiant"):
        inv.host("nope")


def test_slots_make_a_host_of_each_vm(tmp_path):
    text = INVENTORY.replace("    work_dir: /var/tmp/fb", "    work_dir: /var/tmp/fb\n    slots: 3")
    inv = load_inventory([write(tmp_path, "lab.yaml", text)])
    slots = inv.host("prime-radiant").slot_hosts()
    assert [(h.name, h.work_dir, h.target.guest.port, h.slots) for h in slots[1:]] == [
        ("prime-radiant#2", "/var/tmp/fb/slot-2", 10023, 1), ("prime-radiant#3", "/var/tmp/fb/slot-3", 10024, 1)]
    assert slots[0] is inv.host("prime-radiant")  # slot 1 is the host as written
    assert slots[0].target.guest.port == 10022 and slots[0].ssh == slots[1].ssh
    assert inv.host("prime-radiant#3") == slots[2]  # how a resumed run names it
    with pytest.raises(UserError, match="has 3 slot"):
        inv.host("prime-radiant#4")
    with pytest.raises(UserError, match="a slot is prime-radiant#<number>"):
        inv.host("prime-radiant#two")


def test_slots_need_a_qemu_target_and_room_for_their_ports(tmp_path):
    text = INVENTORY.replace("    work_dir: /var/tmp/fb", "    work_dir: /var/tmp/fb\n    slots: 2")
    found = problems(load_inventory, [write(tmp_path, "ports.yaml", text.replace("port: 10022", "port: 65535"))])
    assert len(found) == 1 and "guest ports 65535..65536, past 65535" in found[0], found
    found = problems(load_inventory, [write(tmp_path, "kind.yaml", text.replace(
        "kind: qemu\n      accel: tcg", "kind: libvirt\n      domain: vm1"))])
    assert len(found) == 1 and "slots: 2 needs target kind qemu" in found[0], found
    assert found[0].startswith(f"{tmp_path / 'kind.yaml'}:2 hosts.prime-radiant"), found


def test_inventory_problems_name_file_line_and_field(tmp_path):
    text = (INVENTORY.replace("port: 10022", "port: ten")
            .replace("accel: tcg", "accel: fast")
            .replace("    work_dir: /var/tmp/fb", "    work_dir: relative/dir\n    wrk_dir: /x"))
    path = write(tmp_path, "bad.yaml", text)
    found = problems(load_inventory, [path])
    line = {key: n for n, ln in enumerate(text.splitlines(), 1) for key in [ln.split(":")[0].strip()]}
    assert f"{path}:{line['work_dir']} hosts.prime-radiant.work_dir: must be an absolute path on the host" in found
    assert f"{path}:{line['wrk_dir']} hosts.prime-radiant.wrk_dir: unknown field (a typo?)" in found
    assert any(p.startswith(f"{path}:{line['accel']} hosts.prime-radiant.target.accel:") for p in found), found
    # `port` appears twice; the guest's is the later one, which the dict keeps.
    assert any(p.startswith(f"{path}:{line['port']} hosts.prime-radiant.target.guest.port:") for p in found), found
    assert len(found) == 4


def test_a_host_defined_twice_names_both_files(tmp_path):
    a = write(tmp_path, "a.yaml", INVENTORY)
    b = write(tmp_path, "b.yaml", INVENTORY)
    (found,) = problems(load_inventory, [tmp_path])
    assert found == f"{b}:2 hosts.prime-radiant: already defined in {a}"


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "pb.yaml", "name: x\nbuild:\n  timeout: [1\n")
    (found,) = problems(load_playbook, path)
    assert found.startswith(f"{path}:4: invalid YAML")


def test_duplicate_keys_are_refused(tmp_path):
    path = write(tmp_path, "pb.yaml", "name: x\nname: y\n")
    (found,) = problems(load_playbook, path)
    assert found == f"{path}:2 name: duplicate key 'name'"


def test_playbook_problems_see_through_the_reproducer_kind(tmp_path):
    text = (ROOT / "playbooks" / "scp-stress.yaml").read_text()
    path = write(tmp_path, "pb.yaml", text.replace("size: 1G", "size: lots").replace("  timeout: 2m\n", ""))
    found = problems(load_playbook, path)
    line = text.splitlines().index("  size: 1G") + 1
    assert f"{path}:{line} reproducer.size: 'lots' is not a size in whole bytes such as 4096, 64K, 8M or 1G, from 1 byte to 1T" in found
    assert any(p.endswith("reproducer.timeout: Field required") for p in found), found


def test_policy_can_never_call_an_untested_step_good_or_bad(tmp_path):
    text = (ROOT / "playbooks" / "scp-stress.yaml").read_text()
    path = write(tmp_path, "pb.yaml", text.replace("boot-failed: skip", "wrong-kernel: good"))
    (found,) = problems(load_playbook, path)
    assert "policy.outcomes: wrong-kernel: good refused" in found


def test_policy_map_fills_in_defaults(tmp_path):
    text = (ROOT / "playbooks" / "scp-stress.yaml").read_text()
    pb = load_playbook(write(tmp_path, "pb.yaml", text.replace("boot-failed: skip", "boot-failed: bad")))
    m = pb.policy_map()
    assert m[OutcomeKind.BOOT_FAILED] == "bad" and m[OutcomeKind.INFRA_ERROR] == "retry"
    assert m[OutcomeKind.BUILD_FAILED] == "skip"


def test_artifacts_stay_inside_the_tree(tmp_path):
    text = (ROOT / "playbooks" / "scp-stress.yaml").read_text()
    path = write(tmp_path, "pb.yaml", text.replace("kernel: arch/x86/boot/bzImage", "kernel: ../../etc/passwd"))
    (found,) = problems(load_playbook, path)
    assert "artifacts: Value error" not in found and "artifacts are paths inside the tree" in found


@pytest.mark.parametrize("kind,path", [("inventory", "inventory/schema.json"), ("playbook", "playbooks/schema.json")])
def test_published_schemas_are_current(kind, path, capsys):
    from fleetbisect.cli import main

    assert main(["schema", kind]) == 0
    assert capsys.readouterr().out == (ROOT / path).read_text(), f"regenerate: fleetbisect schema {kind} > {path}"
