"""The libvirt target's pure parts: domain XML edits, the built-in template, `virsh domifaddr`
parsing, the inventory model, and the commands it sends (against a scripted host)."""

from __future__ import annotations

import re
import shlex
import types
from pathlib import Path

import pytest

from fleetbisect.deadline import Deadline
from fleetbisect.remote.base import Result
from fleetbisect.remote.fake import FakeRemote
from fleetbisect.targets import KINDS, domainxml as dx, select
from fleetbisect.targets.base import TargetStartFailed
from fleetbisect.targets.libvirt import Libvirt, LibvirtConfig, VirshError

USER_DOMAIN = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>repro-vm</name>
  <uuid>7b3f9b38-7132-4e1d-9818-2557b01ead4c</uuid>
  <memory unit='KiB'>524288</memory>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <initrd>/boot/old-initrd</initrd>
    <boot dev='hd'/>
  </os>
  <on_reboot>restart</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='pty'><target type='isa-serial' port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <console type='pty'><target type='virtio' port='1'/></console>
    <graphics type='vnc' port='-1' passwd='hunter2'/>
  </devices>
  <qemu:commandline><qemu:arg value='-no-hpet'/></qemu:commandline>
</domain>
"""

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9 guest"


def os_children(root):
    return [(c.tag, c.text) for c in root.find("os")]


def test_direct_kernel_boot_sets_kernel_initrd_cmdline_in_schema_order():
    root = dx.parse(USER_DOMAIN)
    dx.direct_kernel_boot(root, "/w/blobs/k", "/w/blobs/i", "console=ttyS0 panic=-1")
    assert os_children(root) == [
        ("type", "hvm"), ("kernel", "/w/blobs/k"), ("initrd", "/w/blobs/i"),
        ("cmdline", "console=ttyS0 panic=-1"), ("boot", None),
    ]
    # a second step replaces, never adds
    dx.direct_kernel_boot(root, "/w/blobs/k2", "/w/blobs/i2", "quiet")
    assert [t for t, _ in os_children(root)].count("kernel") == 1
    assert root.findtext("os/kernel") == "/w/blobs/k2" and root.findtext("os/cmdline") == "quiet"


def test_a_step_without_initrd_drops_the_domains_old_one():
    root = dx.parse(USER_DOMAIN)
    dx.direct_kernel_boot(root, "/k", None, "quiet")
    assert root.find("os/initrd") is None


def test_serial_console_logs_a_pty_serial_and_drops_only_its_mirror_console():
    root = dx.parse(USER_DOMAIN)
    dx.serial_console(root, "/w/libvirt/repro-vm.console.log")
    serial = root.find("devices/serial")
    assert serial.get("type") == "pty"  # `virsh console` keeps working
    assert serial.find("log").attrib == {"file": "/w/libvirt/repro-vm.console.log", "append": "off"}
    assert [c.find("target").get("type") for c in root.findall("devices/console")] == ["virtio"]
    # the <log> goes before <target>, where the schema wants it
    assert [c.tag for c in serial] == ["log", "target"]


def test_serial_console_points_a_file_serial_at_our_file_and_adds_one_when_missing():
    root = dx.parse("<domain><os/><devices><serial type='file'><source path='/var/x.log'/>"
                    "<target port='0'/></serial></devices></domain>")
    dx.serial_console(root, "/w/c.log")
    assert root.find("devices/serial/source").attrib == {"path": "/w/c.log", "append": "off"}
    bare = dx.parse("<domain><os/><devices><console type='pty'/></devices></domain>")
    dx.serial_console(bare, "/w/c.log")
    assert bare.find("devices/serial").get("type") == "pty"
    assert bare.find("devices/serial/log").get("file") == "/w/c.log"


def test_no_restart_and_namespaces_survive():
    root = dx.parse(USER_DOMAIN)
    dx.no_restart(root)
    text = dx.serialize(root)
    again = dx.parse(text)
    assert [again.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3
    assert "xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\"" in text
    assert again.find(f"{{{dx.QEMU_NS}}}commandline/{{{dx.QEMU_NS}}}arg").get("value") == "-no-hpet"
    # lifecycle elements sit before <devices>
    tags = [c.tag for c in again]
    assert tags.index("on_crash") < tags.index("devices")


def test_builtin_template_user_networking_and_libvirt_network():
    text = dx.builtin("fb-x", domain_type="qemu", machine="q35", memory_mb=512, cpus=1, network="user",
                      guest_address="127.0.0.1", guest_port=10022)
    root = dx.parse(text)
    assert root.get("type") == "qemu" and root.findtext("name") == "fb-x"
    args = [a.get("value") for a in root.iter(f"{{{dx.QEMU_NS}}}arg")]
    assert "user,id=fbnet0,hostfwd=tcp:127.0.0.1:10022-:22" in args
    assert any("bus=pcie.0,addr=0x10" in a for a in args)
    assert root.find("devices/memballoon").get("model") == "none"
    net = dx.parse(dx.builtin("fb-x", domain_type="kvm", machine="q35", memory_mb=1024, cpus=2,
                              network="default", guest_address="-", guest_port=22))
    assert net.find("devices/interface/source").get("network") == "default"
    assert net.find(f"{{{dx.QEMU_NS}}}commandline") is None


def test_set_name_drops_uuid_and_redacted_hides_passwords():
    root = dx.parse(USER_DOMAIN)
    dx.set_name(root, "fb-copy")
    assert root.findtext("name") == "fb-copy" and root.find("uuid") is None
    shown = dx.redacted(USER_DOMAIN)
    assert "hunter2" not in shown and "passwd=\"***\"" in shown


def test_parse_refuses_what_is_not_a_domain():
    with pytest.raises(dx.DomainXMLError, match="well-formed"):
        dx.parse("<domain>")
    with pytest.raises(dx.DomainXMLError, match="<network>"):
        dx.parse("<network/>")


def test_parse_domifaddr():
    out = """ Name       MAC address          Protocol     Address
-------------------------------------------------------------------------------
 lo         00:00:00:00:00:00    ipv4         127.0.0.1/8
 vnet0      52:54:00:aa:bb:cc    ipv6         fe80::5054:ff:feaa:bbcc/64
 -          -                    ipv6         fd00::5/64
 vnet0      52:54:00:aa:bb:cc    ipv4         192.168.122.57/24
"""
    assert dx.parse_domifaddr(out) == ["192.168.122.57", "fd00::5"]
    assert dx.parse_domifaddr("") == []


# --- the target against a scripted host ------------------------------------------------------


def make_target(tmp_path: Path, **fields) -> Libvirt:
    cfg = LibvirtConfig(**{"kind": "libvirt", "guest": {"port": 10022, "host_key": KEY}, "domain": "repro-vm", **fields})
    host_cfg = types.SimpleNamespace(name="h", work_dir="/w", target=cfg)
    boot = types.SimpleNamespace(cmdline="console=ttyS0", memory=512, cpus=1)
    return select("libvirt")(host_cfg, types.SimpleNamespace(boot=boot, disk_image=None))


def test_registered_as_libvirt():
    assert KINDS["libvirt"] is Libvirt


def test_domain_names_that_would_escape_the_work_dir_are_refused():
    for bad in ("../x", "a/b", ".hidden", "", "x" * 65):
        with pytest.raises(ValueError):
            LibvirtConfig(kind="libvirt", domain=bad, guest={"port": 1, "host_key": KEY})


def test_stop_destroys_only_a_running_domain_by_name(tmp_path):
    t = make_target(tmp_path, template="builtin")
    host = FakeRemote("h", strict=True)
    host.on("virsh -q -c qemu:///system domstate repro-vm", stdout="shut off\n\n")
    assert t.stop(host, Deadline.after(10)) == ""
    host.on("virsh -q -c qemu:///system domstate repro-vm", stdout="running\n\n")
    host.on("virsh -q -c qemu:///system destroy repro-vm")
    assert t.stop(host, Deadline.after(10)) == "destroyed domain repro-vm (was running)"
    host.on("virsh -q -c qemu:///system domstate repro-vm", exit_status=1,
            stderr="error: failed to get domain 'repro-vm'\n")
    assert t.stop(host, Deadline.after(10)) == ""


def test_virsh_errors_carry_their_text(tmp_path):
    t = make_target(tmp_path, template="builtin")
    host = FakeRemote("h")
    host.on(re.compile("domstate"), exit_status=1,
            stderr="error: failed to connect to the hypervisor\nerror: Failed to connect socket to '/run/libvirt/libvirt-sock'\n")
    with pytest.raises(VirshError, match="Failed to connect socket"):
        t.alive(host, Deadline.after(10))
    host.on(re.compile("virsh .* start repro-vm"), exit_status=1,
            stderr="error: Failed to start domain 'repro-vm'\nerror: Cannot access storage file '/w/k'\n")
    with pytest.raises(TargetStartFailed, match="Cannot access storage file"):
        t.start(host, {"kernel": "/w/k"}, tmp_path, Deadline.after(10))


def test_a_domain_of_that_name_that_is_not_ours_is_never_defined_over(tmp_path):
    t = make_target(tmp_path, template="builtin")
    host = FakeRemote("h")
    host.on("test -s /w/libvirt/repro-vm.defined", exit_status=1)
    host.on(re.compile("^virsh .* domstate"), stdout="running\n")
    with pytest.raises(TargetStartFailed, match="fleetbisect did not define it"):
        t.deploy(host, {"kernel": "/w/k"}, tmp_path, Deadline.after(10))
    assert not any(" define " in c.command or "destroy" in c.command for c in host.calls)


def test_step_xml_of_an_existing_domain_starts_from_the_saved_original(tmp_path):
    t = make_target(tmp_path)
    host = FakeRemote("h")
    host.on(re.compile(r"dumpxml --inactive --security-info"), stdout=USER_DOMAIN)
    host.on(re.compile("^virsh .* domstate"), stdout="shut off\n")
    t.deploy(host, {"kernel": "/w/blobs/k", "initrd": "/w/blobs/i"}, tmp_path, Deadline.after(10))
    (define,) = [c for c in host.calls if " define " in c.command]
    sent = dx.parse(define.stdin.decode())
    assert sent.findtext("os/kernel") == "/w/blobs/k" and sent.findtext("name") == "repro-vm"
    assert sent.findtext("uuid") == "7b3f9b38-7132-4e1d-9818-2557b01ead4c"  # the same domain
    assert sent.find("devices/serial/log").get("file") == "/w/libvirt/repro-vm.console.log"
    assert "hunter2" in define.stdin.decode()  # defined with its password intact...
    assert "hunter2" not in (tmp_path / "domain.xml").read_text()  # ...which the evidence hides
    # saved once: the save script keeps an existing copy (never overwritten)
    (save,) = [c for c in host.calls if "orig.xml" in c.command]
    assert '[ ! -s "$f" ]' in save.command


# --- disk image, agent, passthrough, virtiofs in the domain ------------------------------------

DISKED_DOMAIN = """<domain type='kvm'><name>repro-vm</name><memory unit='KiB'>1048576</memory>
<os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
<devices><disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/>
<source dev='/dev/vg/repro'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda' bus='sata'/></disk>
<interface type='network'><source network='default'/></interface></devices></domain>"""


def test_the_deployed_image_becomes_the_domains_own_disk_and_the_rest_is_kept(tmp_path):
    t = make_target(tmp_path)
    t.disk = ("/srv/repro.raw", "raw")
    root = dx.parse(t.step_xml(DISKED_DOMAIN, {"image": "/w/blobs/abc.sparse"}))
    disks = root.findall("devices/disk")
    assert [d.get("device") for d in disks] == ["disk", "cdrom"]  # the cdrom is left alone
    main = disks[0]
    assert main.get("type") == "file" and main.find("source").attrib == {"file": "/srv/repro.raw"}
    assert main.find("driver").attrib == {"name": "qemu", "type": "raw"}
    assert main.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert root.find("os/kernel") is None  # no kernel artifact: the image boots itself
    assert root.find("devices/interface/source").get("network") == "default"


def test_a_domain_without_a_disk_gets_one_and_a_kernel_still_boots_directly(tmp_path):
    t = make_target(tmp_path)
    t.disk = ("/w/disk.raw", "qcow2")
    base = "<domain type='qemu'><name>x</name><os><type>hvm</type></os><devices/></domain>"
    root = dx.parse(t.step_xml(base, {"kernel": "/w/k", "image": "/w/i"}))
    (disk,) = root.findall("devices/disk")
    assert disk.find("source").get("file") == "/w/disk.raw" and disk.find("driver").get("type") == "qcow2"
    assert root.find("os/kernel").text == "/w/k"


def test_the_agent_channel_passthrough_and_virtiofs_are_added_to_the_domain(tmp_path):
    t = make_target(tmp_path, pci=["0000:03:00.0"], virtiofs={"source": "/srv/share", "tag": "share"},
                    guest={"reach": "agent"})
    root = dx.parse(t.step_xml(DISKED_DOMAIN, {"kernel": "/w/k"}))
    names = [c.find("target").get("name") for c in root.findall("devices/channel")]
    assert names == ["org.qemu.guest_agent.0"]
    (hostdev,) = root.findall("devices/hostdev")
    assert hostdev.find("source/address").attrib["bus"] == "0x03"
    (fs,) = root.findall("devices/filesystem")
    assert fs.find("driver").get("type") == "virtiofs" and fs.find("target").get("dir") == "share"
    assert root.find("memoryBacking/access").get("mode") == "shared"
    again = dx.parse(t.step_xml(dx.serialize(root), {"kernel": "/w/k"}))
    assert len(again.findall("devices/channel")) == 1  # not added twice


def test_reach_agent_logs_in_through_virsh_qemu_agent_command(tmp_path):
    import json

    t = make_target(tmp_path, guest={"reach": "agent"})
    host = FakeRemote("h")

    def agent(call):
        request = json.loads(shlex.split(call.command)[-1])
        reply = {"return": {}} if request["execute"] == "guest-ping" else {"return": request.get("arguments", {}).get("id", 0)}
        return Result(call.command, 0, json.dumps(reply), "", 0.0)

    host.on(re.compile("qemu-agent-command"), agent)
    assert t.probe(host) and t.reached_by == "the guest agent"
    guest = t.login(host, Deadline.after(10))
    assert any("qemu-agent-command" in c.command and "repro-vm" in c.command for c in host.calls)
    guest.close()
