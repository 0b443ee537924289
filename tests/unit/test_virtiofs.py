"""virtiofs: QEMU's arguments, the virtiofsd command line and libvirt's XML against golden files
(untested on a live guest: Debian 12 has no virtiofsd), and the host script that starts and stops
virtiofsd, run by the real sh with a stand-in daemon that serves the socket."""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fleetbisect.config.target import Virtiofs
from fleetbisect.deadline import Deadline
from fleetbisect.remote.local import LocalRemote
from fleetbisect.targets import virtiofs
from fleetbisect.targets.base import TargetStartFailed

from .golden import check_golden

CFG = Virtiofs(source="/srv/guest root", tag="rootfs", virtiofsd="/usr/local/bin/virtiofsd", cache="never")


def xml(el: ET.Element) -> str:
    ET.indent(el)
    return ET.tostring(el, encoding="unicode") + "\n"


def test_qemu_args_golden():
    argv = virtiofs.qemu_args(CFG, "/var/tmp/fb/vm/virtiofs.sock", 512)
    check_golden("virtiofs/qemu-args.txt", "\n".join(argv) + "\n")
    # the memory backend is the guest's whole RAM, shared with virtiofsd
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in argv
    assert argv[argv.index("-device") + 1] == "vhost-user-fs-pci,chardev=vfs0,tag=rootfs"


def test_virtiofsd_argv_golden():
    argv = virtiofs.virtiofsd_argv(CFG, "/var/tmp/fb/vm/virtiofs.sock")
    check_golden("virtiofs/virtiofsd-argv.txt", "\n".join(argv) + "\n")
    assert argv[argv.index("--shared-dir") + 1] == "/srv/guest root"  # one word, whatever it holds


def test_libvirt_xml_golden():
    check_golden("virtiofs/filesystem.xml", xml(virtiofs.filesystem_xml(CFG)))
    check_golden("virtiofs/memory-backing.xml", xml(virtiofs.memory_backing_xml()))
    default = virtiofs.filesystem_xml(Virtiofs(source="/srv/x"))
    assert default.find("binary/cache") is None  # cache=auto: virtiofsd's own default
    assert default.find("target").get("dir") == "fleetbisect"


def test_config_refuses_relative_paths_and_bad_tags():
    with pytest.raises(ValueError, match="absolute"):
        Virtiofs(source="srv/x")
    with pytest.raises(ValueError):
        Virtiofs(source="/srv/x", tag="has space")


STAND_IN = """\
import socket, sys, signal, time
args = sys.argv[1:]
sock = args[args.index("--socket-path") + 1]
if "{fail}" == "yes":
    print("virtiofsd: cannot open shared dir", file=sys.stderr); sys.exit(1)
s = socket.socket(socket.AF_UNIX); s.bind(sock); s.listen(1)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    signal.pause()
"""


def stand_in(tmp_path: Path, fail: bool = False) -> Virtiofs:
    script = tmp_path / "virtiofsd"
    script.write_text(f"#!{sys.executable}\n" + STAND_IN.replace("{fail}", "yes" if fail else "no"))
    script.chmod(0o755)
    return Virtiofs(source=str(tmp_path), virtiofsd=str(script))


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_virtiofsd_starts_with_its_socket_and_stops_by_its_pidfile(tmp_path):
    cfg, vm = stand_in(tmp_path), str(tmp_path / "vm")
    host = LocalRemote("host")
    argv = virtiofs.start_virtiofsd(host, cfg, vm, Deadline.after(60))
    pid = int(Path(virtiofs.pidfile(vm)).read_text())
    try:
        assert Path(virtiofs.socket_path(vm)).is_socket()
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:-1] == [a.encode() for a in argv]
        assert virtiofs.stop_virtiofsd(host, vm, Deadline.after(60)) == f"stopped virtiofsd {pid}"
        assert gone(pid)
        assert not Path(virtiofs.pidfile(vm)).exists() and not Path(virtiofs.socket_path(vm)).exists()
        assert virtiofs.stop_virtiofsd(host, vm, Deadline.after(60)) == ""  # idempotent
    finally:
        if not gone(pid):
            os.kill(pid, 9)


def test_a_virtiofsd_that_exits_is_a_start_failure_with_its_words(tmp_path):
    cfg, vm = stand_in(tmp_path, fail=True), str(tmp_path / "vm")
    with pytest.raises(TargetStartFailed, match="cannot open shared dir"):
        virtiofs.start_virtiofsd(LocalRemote("host"), cfg, vm, Deadline.after(60))


def test_stop_leaves_a_pid_that_is_not_ours_alone(tmp_path):
    vm = tmp_path / "vm"
    vm.mkdir()
    Path(virtiofs.pidfile(str(vm))).write_text(f"{os.getpid()}\n")  # a recycled PID: this very test
    assert virtiofs.stop_virtiofsd(LocalRemote("host"), str(vm), Deadline.after(60)) == ""
    assert not Path(virtiofs.pidfile(str(vm))).exists()


def test_probes(tmp_path):
    host = LocalRemote("host")
    (ok,) = virtiofs.probes(host, stand_in(tmp_path), Deadline.after(60))
    assert ok.ok
    (bad,) = virtiofs.probes(host, Virtiofs(source=str(tmp_path), virtiofsd="/nonexistent/virtiofsd"),
                             Deadline.after(60))
    assert not bad.ok and "Debian 12 ships none" in bad.detail
    (bad,) = virtiofs.probes(host, Virtiofs(source=str(tmp_path / "nope"), virtiofsd=str(tmp_path / "virtiofsd")),
                             Deadline.after(60))
    assert not bad.ok and "not a directory" in bad.detail


def test_qemu_argv_and_the_qemu_target_start_virtiofsd_first(tmp_path):
    from types import SimpleNamespace

    from fleetbisect.targets.qemu import Qemu, QemuConfig, VMPaths, qemu_argv

    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9 guest"
    fs = stand_in(tmp_path)
    cfg = QemuConfig(kind="qemu", qemu="true", accel="tcg", guest={"port": 10022, "host_key": key},
                     virtiofs=fs.model_dump())
    boot = SimpleNamespace(memory=256, cpus=1, cmdline="root=fleetbisect rootfstype=virtiofs", root=None,
                           qemu_args=[])
    argv = qemu_argv(cfg, boot, kernel="k", initrd=None, paths=VMPaths("/w,x/vm"))
    assert "socket,id=vfs0,path=/w,,x/vm/virtiofs.sock" in argv  # a comma doubled, as QEMU reads it
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in argv

    host_cfg = SimpleNamespace(name="box", target=cfg, work_dir=str(tmp_path / "work"))
    target = Qemu(host_cfg, SimpleNamespace(boot=boot, disk_image=None))
    (tmp_path / "step").mkdir()
    host = LocalRemote("host")
    target.start(host, {"kernel": "k"}, tmp_path / "step", Deadline.after(60))  # QEMU: `true`
    pid = int(Path(virtiofs.pidfile(target.paths.dir)).read_text())
    try:
        commands = (tmp_path / "step" / "commands.txt").read_text().splitlines()
        assert commands[0].startswith(f"{fs.virtiofsd} --socket-path ") and commands[1].startswith("true ")
        assert Path(virtiofs.socket_path(target.paths.dir)).is_socket()
        assert f"stopped virtiofsd {pid}" in target.stop(host, Deadline.after(60))
        assert gone(pid)
    finally:
        if not gone(pid):
            os.kill(pid, 9)
