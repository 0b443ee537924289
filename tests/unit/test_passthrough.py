"""PCI passthrough: the preflight reads a fake host (sysfs tree, /proc/mounts, `ip`, `lspci`,
SSH_CONNECTION) through the real script run by the real `sh`; bind and restore run their real
scripts against a fake sysfs whose write-only files a fake kernel serves (tests/unit/fakesysfs.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fleetbisect.config.inventory import load_inventory
from fleetbisect.deadline import Deadline
from fleetbisect.errors import ConfigError
from fleetbisect.remote.base import RemoteCommandFailed
from fleetbisect.remote.local import LocalRemote
from fleetbisect.targets.passthrough import Passthrough, hostdev_xml, memlock_check, vfio_args

from .fakesysfs import Dev, FakeSysfs
from .golden import check_golden

ROOT = Path(__file__).resolve().parents[2]

WIFI, AUDIO, BRIDGE = "0000:02:00.0", "0000:02:00.1", "0000:00:1c.0"
AHCI = "0000:00:17.0"
NVME, USB = "0000:01:00.0", "0000:01:00.1"
NIC, NIC2 = "0000:00:1f.6", "0000:03:00.0"
LONE = "0000:04:00.0"

DEVICES = [
    Dev(BRIDGE, "0x060400", "pcieport", 9),
    Dev(WIFI, "0x028000", "iwlwifi", 9, ("0x8086", "0x2723")),
    Dev(AUDIO, "0x040300", "snd_hda_intel", 9),
    Dev(AHCI, "0x010601", "ahci", 5),
    Dev(NVME, "0x010802", "nvme", 6),
    Dev(USB, "0x0c0330", "xhci_hcd", 6),
    Dev(NIC, "0x020000", "e1000e", 7),
    Dev(NIC2, "0x020000", "e1000e", 8),
    Dev(LONE, "0x0c0330", None, 10),
]

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
proc /proc proc rw 0 0
/dev/mapper/vg-home /home ext4 rw 0 0
tmpfs /run tmpfs rw 0 0
"""

IP = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: eth0    inet 192.0.2.10/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever preferred_lft forever
2: eth0    inet6 2001:db8::10/64 scope global \\       valid_lft forever preferred_lft forever
5: br0    inet 198.51.100.7/24 brd 198.51.100.255 scope global br0\\       valid_lft forever preferred_lft forever
"""

LSPCI = {
    BRIDGE: f"{BRIDGE} PCI bridge [0604]: Intel Corporation PCI Express Root Port [8086:a33c] (rev f0)",
    WIFI: f"{WIFI} Network controller [0280]: Intel Corporation Wi-Fi 6 AX200 [8086:2723] (rev 1a)",
    AUDIO: f"{AUDIO} Audio device [0403]: Intel Corporation Device [8086:1234]",
}


@pytest.fixture
def host(tmp_path):
    """A fake host: sysfs, mounts, tools on PATH; returns (sysfs, LocalRemote factory)."""
    fake = FakeSysfs(tmp_path / "sys", DEVICES)
    fake.add_disk(AHCI, "sda", ["sda1", "sda2"])
    fake.add_disk(NVME, "nvme0n1", ["nvme0n1p1", "nvme0n1p2"])
    fake.add_dm("dm-0", "vg-home", on="nvme0n1p2")
    fake.add_nic(NIC, "eth0")
    fake.add_nic(NIC2, "eth1")
    fake.add_bridge("br0", ["eth1"])
    (tmp_path / "mounts").write_text(MOUNTS)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ip.txt").write_text(IP)
    (bin_dir / "lspci.txt").write_text("".join(line + "\n" for line in LSPCI.values()))
    tool(bin_dir, "ip", '[ "$*" = "-o addr show" ] || exit 2; cat "${0%/*}/ip.txt"')
    tool(bin_dir, "lspci", '[ "$1" = -Dnns ] || exit 2; grep -F "$2 " "${0%/*}/lspci.txt"; exit 0')
    fake.start()
    yield fake
    fake.stop()


def tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def remote(fake: FakeSysfs, ssh: str | None = "192.0.2.99 50122 192.0.2.10 22") -> LocalRemote:
    env = {k: v for k, v in os.environ.items() if k != "SSH_CONNECTION"}
    env["PATH"] = f"{fake.root.parent / 'bin'}:{env['PATH']}"
    if ssh is not None:
        env["SSH_CONNECTION"] = ssh
    return LocalRemote("fakehost", env=env)


def passthrough(fake: FakeSysfs, *addresses: str, tries: int = 100) -> Passthrough:
    return Passthrough(list(addresses), str(fake.root.parent / "work"), sysfs=str(fake.root),
                       mounts=str(fake.root.parent / "mounts"), tries=tries)


def checks(fake, *addresses, memory=512, ssh="192.0.2.99 50122 192.0.2.10 22"):
    found = passthrough(fake, *addresses).probes(remote(fake, ssh), Deadline.after(60), memory)
    return {c.name: c for c in found}


# --- preflight ----------------------------------------------------------------------------


def test_check_lists_the_group_with_lspci_lines_and_what_shares_it(host):
    c = checks(host, WIFI)[f"pci {WIFI}"]
    assert c.ok, c.detail
    lines = c.detail.splitlines()
    assert lines[0] == "IOMMU group 9:"
    assert sorted(line.strip() for line in lines[1:4]) == sorted(LSPCI.values())
    assert f"shared with (taken from the host too, given back after the run): {AUDIO} (snd_hda_intel)" in c.detail
    assert f"bridges left alone: {BRIDGE}" in c.detail  # a bridge is listed, never taken
    assert "REFUSED" not in c.detail


def test_a_device_holding_a_mounted_filesystem_is_refused(host):
    c = checks(host, AHCI)[f"pci {AHCI}"]
    assert not c.ok
    assert f"REFUSED: the host needs {AHCI} holds /dev/sda1 on /" in c.detail


def test_a_group_mate_holding_a_filesystem_through_device_mapper_refuses_the_device(host):
    # the USB controller is harmless, but its group holds the NVMe disk whose partition
    # carries an LVM volume mounted on /home
    c = checks(host, USB)[f"pci {USB}"]
    assert not c.ok
    assert f"{NVME} holds /dev/mapper/vg-home on /home" in c.detail
    assert f"{NVME} (nvme)" in c.detail


def test_the_nic_carrying_the_ssh_session_is_refused(host):
    c = checks(host, NIC, NIC2)
    assert not c[f"pci {NIC}"].ok
    assert f"{NIC} carries this SSH session (eth0, 192.0.2.10)" in c[f"pci {NIC}"].detail
    assert c[f"pci {NIC2}"].ok, c[f"pci {NIC2}"].detail


def test_the_ssh_nic_is_found_under_a_bridge_and_over_ipv6(host):
    c = checks(host, NIC, NIC2, ssh="198.51.100.1 40000 198.51.100.7 22")
    assert c[f"pci {NIC}"].ok
    assert f"{NIC2} carries this SSH session (br0, 198.51.100.7)" in c[f"pci {NIC2}"].detail
    c = checks(host, NIC, ssh="2001:db8::1 40000 2001:db8::10 22")
    assert not c[f"pci {NIC}"].ok


def test_without_ssh_connection_the_check_says_so(host):
    c = checks(host, NIC, ssh=None)
    assert c[f"pci {NIC}"].ok
    assert "was not checked" in c["pci ssh interface"].detail


def test_missing_devices_and_devices_without_a_group(host):
    os.unlink(host.dev_dir(LONE) / "iommu_group")
    c = checks(host, "0000:09:00.0", LONE)
    assert not c["pci 0000:09:00.0"].ok and "no such PCI device" in c["pci 0000:09:00.0"].detail
    assert not c[f"pci {LONE}"].ok and "intel_iommu=on" in c[f"pci {LONE}"].detail


def test_vfio_loaded_or_not_loadable(host, tmp_path):
    assert checks(host, WIFI)["vfio-pci"].ok
    os.rename(host.root / "bus/pci/drivers/vfio-pci", tmp_path / "vfio-away")
    tool(tmp_path / "bin", "modprobe", '[ "$*" = "-n vfio-pci" ] && exit 1; exit 9')
    c = checks(host, WIFI)["vfio-pci"]
    assert not c.ok and "modprobe -n vfio-pci" in c.detail


def test_memlock_comes_from_the_hosts_ulimit(host):
    real = subprocess.run(["sh", "-c", "ulimit -l"], capture_output=True, text=True).stdout.strip()
    c = checks(host, WIFI, memory=1)["memlock"]
    assert real in c.detail
    assert c == memlock_check(real, 1)


@pytest.mark.parametrize("limit,memory,ok", [
    ("unlimited", 1 << 20, True), ("524288", 512, True), ("524287", 512, False), ("8192", 512, False),
    ("", 512, False),
])
def test_memlock_must_hold_all_guest_memory(limit, memory, ok):
    c = memlock_check(limit, memory)
    assert c.ok is ok
    if not ok:
        assert "memlock" in c.detail and str(memory * 1024) in c.detail


# --- bind and restore ---------------------------------------------------------------------


def state_file(fake) -> Path:
    return fake.root.parent / "work" / "passthrough.json"


def test_bind_takes_the_whole_group_then_restore_leaves_the_tree_as_it_was(host):
    before = host.snapshot()
    pt = passthrough(host, WIFI, LONE)
    out = pt.bind(remote(host), Deadline.after(60))
    host.settle()
    assert not host.errors
    # the group's devices (bridge excepted) and the lone unbound one are on vfio-pci
    assert {a: host.driver_of(a) for a in (WIFI, AUDIO, BRIDGE, LONE)} == {
        WIFI: "vfio-pci", AUDIO: "vfio-pci", BRIDGE: "pcieport", LONE: "vfio-pci"}
    assert f"{WIFI}: iwlwifi -> vfio-pci" in out and f"{LONE}: no driver -> vfio-pci" in out
    # exactly what a real host needs, in this order
    assert host.writes == [
        (f"devices/pci0000:00/{WIFI}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/iwlwifi/unbind", WIFI),
        ("bus/pci/drivers_probe", WIFI),
        (f"devices/pci0000:00/{AUDIO}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/snd_hda_intel/unbind", AUDIO),
        ("bus/pci/drivers_probe", AUDIO),
        (f"devices/pci0000:00/{LONE}/driver_override", "vfio-pci"),
        ("bus/pci/drivers_probe", LONE),
    ]
    assert json.loads(state_file(host).read_text()) == {"version": 1, "devices": [
        {"address": WIFI, "driver": "iwlwifi"}, {"address": AUDIO, "driver": "snd_hda_intel"},
        {"address": LONE, "driver": ""}]}

    del host.writes[:]
    out = pt.restore(remote(host), Deadline.after(60))
    assert host.snapshot() == before
    assert not host.errors
    assert not state_file(host).exists()
    assert f"{WIFI}: vfio-pci -> iwlwifi" in out
    assert host.writes[:3] == [
        (f"devices/pci0000:00/{WIFI}/driver_override", ""),
        ("bus/pci/drivers/vfio-pci/unbind", WIFI),
        ("bus/pci/drivers_probe", WIFI),
    ]
    assert host.writes[-2:] == [(f"devices/pci0000:00/{LONE}/driver_override", ""),
                                ("bus/pci/drivers/vfio-pci/unbind", LONE)]  # and left unbound
    # nothing recorded, nothing to do
    assert pt.restore(remote(host), Deadline.after(60)) == ""


def test_a_resumed_run_binds_again_but_keeps_the_original_drivers(host):
    before = host.snapshot()
    pt = passthrough(host, WIFI)
    pt.bind(remote(host), Deadline.after(60))
    recorded = state_file(host).read_text()
    del host.writes[:]
    out = pt.bind(remote(host), Deadline.after(60))  # the next step, or a resumed run's first
    host.settle()
    assert host.writes == [] and f"{WIFI}: on vfio-pci" in out
    assert state_file(host).read_text() == recorded  # not vfio-pci
    pt.restore(remote(host), Deadline.after(60))
    assert host.snapshot() == before


def test_restore_after_a_crash_mid_bind_from_a_fresh_process(host):
    before = host.snapshot()
    host.refuse_vfio.add(AUDIO)  # the second device never reaches vfio-pci: the bind dies there
    with pytest.raises(RemoteCommandFailed, match=f"{AUDIO}: not bound to vfio-pci"):
        passthrough(host, WIFI, tries=3).bind(remote(host), Deadline.after(60))
    host.settle()
    assert host.driver_of(WIFI) == "vfio-pci" and host.driver_of(AUDIO) is None
    assert host.overrides[AUDIO] == "vfio-pci"
    # A new controller process (resume) restores from the record the host keeps.
    code = textwrap.dedent(f"""
        import os, sys
        from fleetbisect.deadline import Deadline
        from fleetbisect.remote.local import LocalRemote
        from fleetbisect.targets.passthrough import Passthrough
        pt = Passthrough([], {str(host.root.parent / 'work')!r}, sysfs={str(host.root)!r})
        print(pt.restore(LocalRemote("host"), Deadline.after(60)))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert f"{AUDIO}: no driver -> snd_hda_intel" in done.stdout
    assert host.snapshot() == before
    assert not state_file(host).exists()


def test_a_record_that_is_not_one_is_refused_before_any_write(host):
    state_file(host).parent.mkdir()
    state_file(host).write_text(json.dumps({"version": 1, "devices": [
        {"address": "0000:02:00.0; reboot", "driver": "iwlwifi"}]}))
    with pytest.raises(ValueError, match="not a passthrough record"):
        passthrough(host, WIFI).restore(remote(host), Deadline.after(60))
    host.settle()
    assert host.writes == []


def test_a_restore_that_cannot_finish_keeps_the_record(host):
    pt = passthrough(host, WIFI, tries=3)
    pt.bind(remote(host), Deadline.after(60))
    # the original driver went away meanwhile (module unloaded): probing finds nothing
    host.native[WIFI] = None
    os.rename(host.root / "bus/pci/drivers/iwlwifi", host.root.parent / "iwlwifi-away")
    with pytest.raises(RemoteCommandFailed, match=f"{WIFI}: not back on iwlwifi"):
        pt.restore(remote(host), Deadline.after(60))
    assert state_file(host).exists()  # a later resume tries again


# --- what QEMU and libvirt get ------------------------------------------------------------


def test_vfio_args_and_hostdev_xml_golden():
    import xml.etree.ElementTree as ET

    argv = vfio_args(["0000:00:14.3", "0000:3B:00.1"])
    assert argv == ["-device", "vfio-pci,host=0000:00:14.3", "-device", "vfio-pci,host=0000:3b:00.1"]
    check_golden("passthrough/vfio-args.txt", "\n".join(argv) + "\n")
    el = hostdev_xml("0000:3b:00.1")
    ET.indent(el)
    check_golden("passthrough/hostdev.xml", ET.tostring(el, encoding="unicode") + "\n")


# --- the inventory ------------------------------------------------------------------------

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9 guest"


def inventory(tmp_path, pci: str) -> Path:
    path = tmp_path / "lab.yaml"
    path.write_text(f"""\
hosts:
  box:
    ssh: {{address: 127.0.0.1, port: 2222}}
    work_dir: /var/tmp/fb
    target:
      kind: qemu
      guest: {{port: 10022, host_key: {KEY}}}
      pci:
{pci}""")
    return path


def test_inventory_pci_addresses_are_normalised(tmp_path):
    inv = load_inventory([inventory(tmp_path, "        - '0000:00:14.3'\n        - 0000:3B:00.1\n")])
    assert inv.host("box").target.pci == ["0000:00:14.3", "0000:3b:00.1"]


@pytest.mark.parametrize("bad,why", [
    ("'00:14.3'", "is not a PCI address DDDD:BB:DD.F"),
    ("0000:00:14.3", "quote PCI addresses"),  # YAML 1.1 reads 14.3 (base 60)
    ("'0000:00:20.0'", "is not a PCI address"),  # device is 5 bits: 00-1f
    ("'0000:00:14.8'", "is not a PCI address"),  # function 0-7
    ("'0000:00:14.3 '", "is not a PCI address"),
])
def test_bad_pci_addresses_name_file_line_and_field(tmp_path, bad, why):
    path = inventory(tmp_path, f"        - '0000:00:14.3'\n        - {bad}\n")
    with pytest.raises(ConfigError) as e:
        load_inventory([path])
    (problem,) = e.value.problems
    assert problem.startswith(f"{path}:10 hosts.box.target.pci.1:") and why in problem


def test_a_pci_address_listed_twice_is_refused(tmp_path):
    path = inventory(tmp_path, "        - '0000:00:14.3'\n        - '0000:00:14.3'\n")
    with pytest.raises(ConfigError) as e:
        load_inventory([path])
    assert "0000:00:14.3 listed twice" in e.value.problems[0]


# --- through the qemu target --------------------------------------------------------------


def qemu_target(fake, tmp_path, pci):
    from types import SimpleNamespace

    from fleetbisect.targets.qemu import Qemu, QemuConfig

    cfg = QemuConfig(kind="qemu", qemu="true", accel="tcg", guest={"port": 10022, "host_key": KEY}, pci=pci)
    host_cfg = SimpleNamespace(name="box", target=cfg, work_dir=str(fake.root.parent / "work"))
    boot = SimpleNamespace(memory=512, cpus=1, cmdline="console=ttyS0", root=None, qemu_args=[])
    target = Qemu(host_cfg, SimpleNamespace(boot=boot, disk_image=None))
    target.passthrough = passthrough(fake, *pci)  # the same, on the fake sysfs
    return target


def test_the_qemu_target_checks_binds_before_it_starts_and_restores(host, tmp_path):
    before = host.snapshot()
    target = qemu_target(host, tmp_path, [WIFI])
    names = {c.name: c.ok for c in target.probes(remote(host), Deadline.after(60))}
    assert names[f"pci {WIFI}"] and names["vfio-pci"] and "memlock" in names
    step_dir = tmp_path / "step"
    step_dir.mkdir()
    target.start(remote(host), {"kernel": "/b/bzImage"}, step_dir, Deadline.after(60))  # QEMU: `true`
    assert host.driver_of(WIFI) == "vfio-pci" and host.driver_of(AUDIO) == "vfio-pci"
    assert "-device vfio-pci,host=0000:02:00.0 " in (step_dir / "commands.txt").read_text()
    assert target.restore(remote(host), Deadline.after(60))
    assert host.snapshot() == before


def test_a_group_that_will_not_bind_is_a_start_failure_not_a_verdict(host, tmp_path):
    from fleetbisect.targets.base import TargetStartFailed

    host.refuse_vfio.add(WIFI)
    target = qemu_target(host, tmp_path, [WIFI])
    target.passthrough.tries = 3
    (tmp_path / "step").mkdir()
    with pytest.raises(TargetStartFailed, match=f"PCI passthrough: passthrough: {WIFI}: not bound to vfio-pci"):
        target.start(remote(host), {"kernel": "k"}, tmp_path / "step", Deadline.after(60))


def test_qemu_argv_passes_the_named_devices_only():
    from types import SimpleNamespace

    from fleetbisect.targets.qemu import VMPaths, qemu_argv

    target = SimpleNamespace(qemu="qemu-system-x86_64", machine="q35", accel="tcg", pci=[WIFI, NIC],
                             virtiofs=None, guest=SimpleNamespace(address="127.0.0.1", port=10022, has_agent=False))
    boot = SimpleNamespace(memory=512, cpus=1, cmdline="c", root=None, qemu_args=["-cpu", "max"])
    argv = qemu_argv(target, boot, kernel="k", initrd=None, paths=VMPaths("/w/vm"))
    i = argv.index(f"vfio-pci,host={WIFI}")
    assert argv[i - 1:i + 3] == ["-device", f"vfio-pci,host={WIFI}", "-device", f"vfio-pci,host={NIC}"]
    assert f"vfio-pci,host={AUDIO}" not in argv  # group mates are bound, not given to the guest
    assert argv[-5:] == ["-cpu", "max", "-daemonize", "-pidfile", "/w/vm/qemu.pid"]


def test_check_prints_what_the_host_said_as_text(monkeypatch):
    """lspci lines and paths hold brackets: `check` must print them, not read them as markup."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from fleetbisect import check
    from fleetbisect.ui import UI

    detail = f"IOMMU group 9:\n  {LSPCI[WIFI]}\n  REFUSED: the host needs [/dev/sda1] [red] on /"
    monkeypatch.setattr(check, "probe_host", lambda h, p: [check.Probe(f"pci {WIFI}", False, detail)])
    monkeypatch.setattr(check, "identity_probe", lambda p: check.Probe("kernel identity", True, "verified"))
    out = io.StringIO()
    ok = check.check_host(SimpleNamespace(name="box"), SimpleNamespace(name="pb"),
                          UI(Console(file=out, width=300, highlight=False)))
    assert not ok
    assert "[8086:2723]" in out.getvalue() and "[/dev/sda1] [red] on /" in out.getvalue()


def test_a_run_refuses_to_bind_what_check_would_refuse(host):
    """`run` does not rely on the user having run `check`: nothing is written, nothing recorded."""
    from fleetbisect.targets.base import TargetStartFailed

    with pytest.raises(TargetStartFailed, match=f"the host needs {NVME} holds /dev/mapper/vg-home on /home"):
        passthrough(host, USB).bind(remote(host), Deadline.after(60))
    with pytest.raises(TargetStartFailed, match=f"{NIC} carries this SSH session"):
        passthrough(host, NIC).bind(remote(host), Deadline.after(60))
    host.settle()
    assert host.writes == [] and not state_file(host).exists()


def test_only_a_vm_with_pci_devices_has_something_to_restore(host, tmp_path):
    from fleetbisect.targets import Target

    assert type(qemu_target(host, tmp_path, [WIFI])).restore is not Target.restore
    assert type(qemu_target(host, tmp_path, [])).restore is Target.restore  # the run skips it
