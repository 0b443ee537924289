"""The lab's bare-metal box: a libvirt domain (under the lab's libvirtd) that boots its default
kernel by itself, has its own sshd (dropbear in the initramfs) and `kexec` to boot a candidate
once. A power cycle (its BMC, lab/bmc.py) or a reboot brings back the default, as firmware
would: the domain's own <kernel>/<initrd> never change.

    box = LabBox.start(lab_libvirt, ensure_assets(), workdir)   # ~5-10 s to SSH under TCG
    box.ssh_port, box.console                                    # 127.0.0.1 port, serial log

The default initramfs prints DEFAULT_RELEASE from /etc/fleetbisect/release, as every lab build
prints its own: the box itself is the only thing that tells which kernel it runs. Candidates
come from a lab repo generated over `box_repo_assets()`, whose base initramfs also holds kexec,
so a candidate can kexec the next one.
"""

from __future__ import annotations

import dataclasses
import gzip
import time
from pathlib import Path

from ..initramfs import add_binary
from ..targets import domainxml as dx
from .cpio import CpioWriter
from .image import LabAssets
from .libvirtd import LabDomain, LabLibvirt, unique_name, virsh
from .vmhost import banner_ready, free_port

DEFAULT_RELEASE = "6.1.0-lab-known-good"
CMDLINE = "console=ttyS0 panic=-1"
BOOT_TIMEOUT = 300.0


def _gz_cpio(build) -> bytes:
    img = CpioWriter()
    build(img)
    return gzip.compress(img.to_bytes(), mtime=0)


# A box keeps its work dir and /boot on file systems of their own (df answers for them).
MOUNTS_HOOK = """#!/bin/sh
mkdir -p /var/tmp /boot
mount -t tmpfs -o size=300m,mode=1777 tmpfs /var/tmp
mount -t tmpfs -o size=100m tmpfs /boot
"""


def _kexec(img: CpioWriter) -> None:
    for d in ("sbin", "lib", "lib64", "usr", "usr/lib", "boot", "var", "lib/x86_64-linux-gnu", "etc",
              "etc/fleetbisect", "etc/fleetbisect/init.d"):
        img.add_dir(d)
    add_binary(img, Path("/sbin/kexec"))
    add_binary(img, Path("/usr/bin/flock"))  # the host lease (busybox has none); util-linux on a real box
    img.add_file("etc/fleetbisect/init.d/05-box-mounts", MOUNTS_HOOK.encode(), 0o755)


def box_repo_assets(assets: LabAssets, workdir: Path) -> LabAssets:
    """The lab assets with kexec added to the base initramfs (concatenated gzip cpio archives:
    the kernel unpacks them in order), for generate_repo: every candidate can kexec."""
    path = Path(workdir) / "box-base-initramfs.img"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(assets.base_initramfs.read_bytes() + _gz_cpio(_kexec))
    return dataclasses.replace(assets, base_initramfs=path)


def default_initramfs(assets: LabAssets, workdir: Path) -> Path:
    """The box's known-good initramfs: the base, kexec, and the release it prints."""
    base = box_repo_assets(assets, workdir).base_initramfs
    path = Path(workdir) / "box-default-initramfs.img"

    def release(img: CpioWriter) -> None:
        img.add_dir("etc")
        img.add_dir("etc/fleetbisect")
        img.add_file("etc/fleetbisect/release", (DEFAULT_RELEASE + "\n").encode(), 0o644)

    path.write_bytes(base.read_bytes() + _gz_cpio(release))
    return path


def box_domain_xml(name: str, *, kernel: str, initrd: str, port: int, console: str) -> str:
    root = dx.parse(dx.builtin(name, domain_type="qemu", machine="q35", memory_mb=512, cpus=1,
                               network="user", guest_address="127.0.0.1", guest_port=port))
    dx.direct_kernel_boot(root, kernel, initrd, CMDLINE)
    dx.serial_console(root, console)
    for log in root.iter("log"):
        log.set("append", "on")  # a power cycle must not erase what the hung kernel printed
    for tag in ("on_reboot", "on_crash"):  # like a machine: a reboot or a crash starts it again
        root.find(tag).text = "restart"
    dx.ET.indent(root)
    return dx.serialize(root)


@dataclasses.dataclass
class LabBox:
    domain: LabDomain
    ssh_port: int
    console: Path
    default_release: str = DEFAULT_RELEASE

    @property
    def name(self) -> str:
        return self.domain.name

    @classmethod
    def start(cls, lv: LabLibvirt, assets: LabAssets, workdir: Path, timeout: float = BOOT_TIMEOUT) -> "LabBox":
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        console = workdir / "box-console.log"
        name = unique_name("fb-box")
        xml = box_domain_xml(name, kernel=str(assets.kernel), initrd=str(default_initramfs(assets, workdir)),
                             port=port, console=str(console))
        box = cls(LabDomain.define(xml, lv.base_dir), port, console)
        try:
            virsh("start", name)
            box.wait_up(timeout)
        except BaseException:
            box.close()
            raise
        return box

    def wait_up(self, timeout: float = BOOT_TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while not banner_ready(self.ssh_port):
            if time.monotonic() > end:
                raise RuntimeError(f"lab box {self.name} did not answer SSH within {timeout:.0f}s; "
                                   f"console tail: {self.console_tail()}")
            time.sleep(0.2)

    def console_tail(self, n: int = 5) -> str:
        try:
            return " | ".join(self.console.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return "(no console)"

    def close(self) -> None:
        self.domain.close()

    def __enter__(self) -> "LabBox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


PASSWORD_ENV = "FLEETBISECT_LAB_BMC_PASSWORD"
BMC_USER = "fbadmin"


def box_inventory(path: Path, box: LabBox, assets: LabAssets, power: dict, *, name: str = "lab-box",
                  oneshot: dict | None = None, console: bool = True) -> Path:
    """The inventory a user would write for this box: SSH to its sshd with its pinned host key,
    its known-good release, kexec as the one-shot boot, the BMC `power` block, and its serial
    log as the console."""
    import yaml

    known_hosts = path.parent / f"{name}.known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{box.ssh_port} {assets.guest_host_key_pub.strip()}\n")
    target = {"kind": "baremetal", "default_release": box.default_release, "power": power,
              "oneshot": oneshot or {"method": "kexec", "reboot": ["reboot", "-f"]},
              "deadlines": {"down": 60, "answer": 10, "nmi": 10, "recover": 240}}
    if console:
        target["console"] = {"kind": "file", "path": str(box.console)}
    entry = {"ssh": {"address": "127.0.0.1", "port": box.ssh_port, "user": assets.guest_user,
                     "key": str(assets.guest_user_key), "known_hosts": str(known_hosts), "connect_timeout": 10},
             "work_dir": "/var/tmp/fleetbisect", "target": target}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"hosts": {name: entry}}, sort_keys=False))
    return path


def ipmi_power(bmc) -> dict:
    return {"kind": "ipmi", "address": bmc.address, "port": bmc.port, "user": BMC_USER, "password_env": PASSWORD_ENV}


def redfish_power(bmc) -> dict:
    return {"kind": "redfish", "url": bmc.url, "system": bmc.system, "user": BMC_USER, "password_env": PASSWORD_ENV}


def start_bmc(kind: str, base_dir: Path, box: LabBox, password: str):
    """The box's BMC of `kind` ("ipmi" or "redfish"), started; (daemon, inventory power block)."""
    from .bmc import SushyEmulator, VirtualBMC

    if kind == "ipmi":
        bmc = VirtualBMC.start(base_dir / "vbmc", box.name, BMC_USER, password)
        return bmc, ipmi_power(bmc)
    bmc = SushyEmulator.start(base_dir / "sushy", box.name, BMC_USER, password)
    return bmc, redfish_power(bmc)
