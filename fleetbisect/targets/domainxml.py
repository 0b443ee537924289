"""libvirt domain XML, as pure functions: what a step changes in a domain, the built-in
template, and the parsing of `virsh` answers. Nothing here talks to a host (targets/libvirt.py
does), so all of it is tested with strings.

A step's domain is `base` (the user's saved original, or the rendered template) with:

    direct_kernel_boot(root, kernel, initrd, cmdline)   <os><kernel>/<initrd>/<cmdline>
    serial_console(root, path)                          serial 0 logged to a file on the host
    no_restart(root)                                    on_poweroff/reboot/crash = destroy

    boot_disk(root, path, fmt)                          the deployed disk image as its disk
    agent_channel(root)                                 the guest agent's virtio-serial port
    add_devices(root, elements)                         <hostdev>, <filesystem> (built elsewhere)
    memory_backing(root, element)                       shared memory, for virtiofs
"""

from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)

# Names fleetbisect accepts for a domain: they also name files in WORK_DIR/libvirt.
DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


class DomainXMLError(ValueError):
    """Not a domain definition fleetbisect can work with; the message says why."""


def parse(text: str) -> ET.Element:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise DomainXMLError(f"not well-formed XML: {e}") from None
    if root.tag != "domain":
        raise DomainXMLError(f"the root element is <{root.tag}>, expected <domain>")
    return root


def serialize(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode") + "\n"


def _child(parent: ET.Element, tag: str, *, before: tuple[str, ...] = ()) -> ET.Element:
    """The first `tag` child of `parent`, created (before the first of `before`) when missing."""
    node = parent.find(tag)
    if node is None:
        node = ET.Element(tag)
        index = next((i for i, c in enumerate(parent) if c.tag in before), len(parent))
        parent.insert(index, node)
    return node


def direct_kernel_boot(root: ET.Element, kernel: str, initrd: str | None, cmdline: str) -> None:
    """Boot `kernel` (+ `initrd`) with `cmdline`; an initrd the domain had is dropped when this
    step has none (it belongs to another kernel)."""
    os_el = root.find("os")
    if os_el is None:
        raise DomainXMLError("the domain has no <os> element")
    after_type = ("loader", "nvram", "boot", "bootmenu", "smbios", "bios", "acpi", "dtb", "initarg")
    _child(os_el, "kernel", before=("initrd", "cmdline", *after_type)).text = kernel
    if initrd:
        _child(os_el, "initrd", before=("cmdline", *after_type)).text = initrd
    else:
        for old in os_el.findall("initrd"):
            os_el.remove(old)
    _child(os_el, "cmdline", before=after_type).text = cmdline


def serial_console(root: ET.Element, path: str) -> None:
    """Serial port 0 is written to `path` on the host, fresh at each start: a `file` serial is
    pointed there, any other kind (pty, tcp, ...) keeps working and is logged there through
    virtlogd (<log file=... append='off'/>). A domain without a serial port gets a pty one."""
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    serial = devices.find("serial")
    if serial is None:
        serial = ET.Element("serial", type="pty")
        ET.SubElement(serial, "target", port="0")
        consoles = [i for i, c in enumerate(devices) if c.tag == "console"]
        devices.insert(consoles[0] if consoles else len(devices), serial)
    if serial.get("type") == "file":
        for old in serial.findall("log"):
            serial.remove(old)
        source = _child(serial, "source")
        source.attrib.clear()
        source.set("path", path)
        source.set("append", "off")
    else:
        log = _child(serial, "log", before=("target", "protocol", "address", "alias"))
        log.attrib.clear()
        log.set("file", path)
        log.set("append", "off")
    # <console> of a serial port mirrors serial 0: libvirt fills it in again from the serial.
    for console in devices.findall("console"):
        target = console.find("target")
        if target is None or target.get("type") in (None, "serial"):
            devices.remove(console)


def _devices(root: ET.Element) -> ET.Element:
    devices = root.find("devices")
    return devices if devices is not None else ET.SubElement(root, "devices")


def boot_disk(root: ET.Element, path: str, fmt: str) -> None:
    """The deployed disk image is the domain's first disk (vda): the first `device='disk'` is
    pointed at it (the domain's own disk in the field case: the saved original is restored at
    the end), or one is added. A fresh copy each step, so it is writable."""
    devices = _devices(root)
    disk = next((d for d in devices.findall("disk") if d.get("device", "disk") == "disk"), None)
    if disk is None:
        disk = ET.Element("disk", type="file", device="disk")
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
        disks = [i for i, c in enumerate(devices) if c.tag == "disk"]
        devices.insert(disks[-1] + 1 if disks else 0, disk)
    disk.set("type", "file")
    for child in list(disk):
        if child.tag in ("source", "driver", "backingStore", "readonly"):
            disk.remove(child)
    disk.insert(0, ET.Element("source", file=path))
    disk.insert(0, ET.Element("driver", name="qemu", type=fmt))


def agent_channel(root: ET.Element) -> None:
    """The QEMU guest agent's virtio-serial port (libvirt picks the socket on the host)."""
    devices = _devices(root)
    for channel in devices.findall("channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == "org.qemu.guest_agent.0":
            return
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")


def add_devices(root: ET.Element, elements: list[ET.Element]) -> None:
    devices = _devices(root)
    for el in elements:
        devices.append(el)


def memory_backing(root: ET.Element, element: ET.Element) -> None:
    """Replace the domain's <memoryBacking> (virtiofs needs shared memory)."""
    for old in root.findall("memoryBacking"):
        root.remove(old)
    index = next((i for i, c in enumerate(root) if c.tag in ("vcpu", "iothreads", "cputune", "os")), len(root))
    root.insert(index, element)


def no_restart(root: ET.Element) -> None:
    """A guest that powers off, reboots (panic=-1) or crashes stays off, as QEMU's -no-reboot:
    the step sees it stopped instead of a reboot loop."""
    before = ("pm", "features", "cpu", "clock", "on_lifecycle_change", "devices")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _child(root, event, before=before).text = "destroy"


def set_name(root: ET.Element, name: str) -> None:
    """Name the domain `name` and drop its <uuid> (libvirt makes one at define)."""
    _child(root, "name").text = name
    for uuid in root.findall("uuid"):
        root.remove(uuid)


def domain_type(root: ET.Element) -> str:
    return root.get("type", "")


def emulator(root: ET.Element) -> str | None:
    node = root.find("devices/emulator")
    return node.text.strip() if node is not None and node.text else None


def hostfwd_args(address: str, port: int, *, addr: str = "0x10") -> list[str]:
    """QEMU user networking forwarding address:port on the host to the guest's sshd, passed
    with <qemu:commandline>; the NIC sits at a fixed slot of pcie.0 (q35), away from the slots
    libvirt assigns to its own devices."""
    return ["-netdev", f"user,id=fbnet0,hostfwd=tcp:{address}:{port}-:22",
            "-device", f"virtio-net-pci,netdev=fbnet0,romfile=,bus=pcie.0,addr={addr}"]


def builtin(name: str, *, domain_type: str, machine: str, memory_mb: int, cpus: int, network: str,
            guest_address: str, guest_port: int, emulator: str | None = None) -> str:
    """The domain fleetbisect defines when the inventory names no template: direct kernel boot
    (the step fills <kernel>/<initrd>/<cmdline>), a serial console, a virtio RNG (a guest without
    one can wait seconds for entropy), no balloon, and either QEMU user networking forwarding
    guest_address:guest_port to the guest's port 22 (`network: user`) or a NIC on the libvirt
    network of that name."""
    root = ET.Element("domain", type=domain_type)
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = str(memory_mb)
    ET.SubElement(root, "vcpu").text = str(cpus)
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine=machine).text = "hvm"
    no_restart(root)
    devices = ET.SubElement(root, "devices")
    if emulator:
        ET.SubElement(devices, "emulator").text = emulator
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    if network != "user":
        nic = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(nic, "source", network=network)
        ET.SubElement(nic, "model", type="virtio")
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.SubElement(devices, "memballoon", model="none")
    if network == "user":
        cmd = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
        for arg in hostfwd_args(guest_address, guest_port):
            ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(root)
    return serialize(root)


def redacted(text: str) -> str:
    """The XML with every password attribute (graphics passwd, ...) replaced, for evidence
    files that leave the host."""
    root = parse(text)
    for node in root.iter():
        for key in node.attrib:
            if "passw" in key.lower():
                node.set(key, "***")
    return serialize(root)


def parse_domifaddr(text: str) -> list[str]:
    """The IPv4 addresses (then IPv6 ones) in `virsh domifaddr` output, prefixes dropped,
    loopback and link-local left out."""
    v4, v6 = [], []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[-2] not in ("ipv4", "ipv6"):
            continue
        try:
            ip = ipaddress.ip_interface(fields[-1]).ip
        except ValueError:
            continue
        if ip.is_loopback or ip.is_link_local:
            continue
        (v4 if ip.version == 4 else v6).append(str(ip))
    return v4 + v6
