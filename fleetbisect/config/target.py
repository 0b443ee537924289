"""What every target kind's inventory entry shares: how the guest is reached and who it is.

Each kind's own model lives with its module in targets/ (e.g. `targets.qemu.QemuConfig`) and
derives from `TargetConfig`; the inventory's `target:` is the union of them, chosen by `kind`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator

from ..remote.base import SSHParams
from .loader import Int, Strict, StrictBool

# domain:bus:device.function, as sysfs and lspci -D spell it (device 00-1f, function 0-7)
PCI_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]")


class Guest(Strict):
    """How the controller reaches the VM once it boots.

    `reach: ssh` (the default) logs in to the guest's sshd: `via: direct` connects to
    address:port from the controller (the port QEMU forwards, or a bridged guest address);
    `via: host` tunnels through the host's SSH connection (direct-tcpip), for guests only the
    host can see. The guest is recreated every step, so its host key is fixed in the image
    (`host_key`: a .pub file or the key line) and checked.

    `reach: agent` goes through the QEMU guest agent (qemu-ga on a virtio-serial port) instead:
    readiness, the kernel check and the reproducers need no network in the guest, which is how
    a regression in the network stack itself is bisected. `port` and `host_key` are then
    optional. `agent: true` gives the VM the agent's channel while the guest is still reached
    by SSH.
    """

    reach: Literal["ssh", "agent"] = "ssh"  # first: the fields below are checked against it
    agent: StrictBool = False
    address: str = "127.0.0.1"
    port: int | None = Int(1, 65535, default=None, validate_default=True)
    via: Literal["direct", "host"] = "host"
    user: str = "root"
    key: str | None = None
    host_key: str | None = Field(None, validate_default=True)

    @property
    def has_agent(self) -> bool:
        """The VM gets the guest agent's virtio-serial channel."""
        return self.agent or self.reach == "agent"

    @field_validator("port", "host_key")
    @classmethod
    def _ssh_needs(cls, v, info: ValidationInfo):
        if v is None and info.data.get("reach", "ssh") == "ssh":
            raise ValueError("required when the guest is reached by SSH (reach: ssh, the default); "
                             "with reach: agent it may be left out")
        return v

    @field_validator("key")
    @classmethod
    def _files(cls, v: str | None) -> str | None:
        return existing_file(v)

    @field_validator("host_key")
    @classmethod
    def _key_line_or_file(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        if not v.startswith(("ssh-", "ecdsa-", "sk-")):
            path = Path(os.path.expanduser(v))
            try:
                with open(path, "rb") as f:
                    v = f.read(64 << 10).decode("utf-8", "replace").strip()
            except OSError as e:
                raise ValueError(f"{str(path)!r} is neither a public key line nor a readable .pub file "
                                 f"({e.strerror or e})")
        return public_key_line(v)


def existing_file(value: str | None) -> str | None:
    """A file the connection will read (a key, known_hosts): missing is an error now, not at
    connect time after the build."""
    if value is not None and not Path(os.path.expanduser(value)).is_file():
        raise ValueError(f"{value!r}: no such file")
    return value


def public_key_line(line: str) -> str:
    """`TYPE BASE64 [COMMENT]`, as in a .pub file, checked by loading the key as SSH will."""
    import paramiko

    parts = line.split()
    why = "expected TYPE BASE64 [COMMENT], e.g. the line of a .pub file"
    if len(parts) >= 2 and "\n" not in line:
        try:
            paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1], validate=True))
            return line
        except binascii.Error:
            why = "its key data is not base64"
        except Exception as e:  # noqa: BLE001 - paramiko raises several kinds for a bad key
            why = f"paramiko cannot load it: {e}"
    shown = line if len(line) <= 60 else line[:57] + "..."
    raise ValueError(f"{shown!r} is not an OpenSSH public key ({why})")




class Virtiofs(Strict):
    """A host directory the guest mounts with virtiofs (`mount -t virtiofs TAG /mnt`, or as its
    root: `rootfstype=virtiofs root=TAG` on the kernel command line). The host runs
    `virtiofsd` (the Rust daemon; Debian 12 ships none) for QEMU, or libvirt starts it."""

    source: str = Field(description="absolute directory on the host to export")
    tag: str = Field("fleetbisect", min_length=1, max_length=36, pattern=r"^[A-Za-z0-9_.-]+$",
                     description="the mount tag the guest names")
    virtiofsd: str = Field("/usr/libexec/virtiofsd", description="the daemon's path on the host")
    cache: Literal["auto", "always", "never"] = "auto"

    @field_validator("source", "virtiofsd")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r} is not an absolute path on the host")
        return v


def pci_address(value: str) -> str:
    """`0000:00:14.3` (any case) -> its lowercase sysfs spelling; anything else is refused."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 0000:00:14.3 as a base-60 number (14.3): the text is lost
        raise ValueError(f"YAML read this address as the number {value!r}: quote PCI addresses, "
                         "'0000:00:14.3'")
    if not isinstance(value, str) or not PCI_ADDRESS.fullmatch(value.lower()):
        raise ValueError(f"{value!r} is not a PCI address DDDD:BB:DD.F such as 0000:00:14.3 "
                         "(`lspci -D` prints them)")
    return value.lower()


PciAddress = Annotated[str, BeforeValidator(pci_address)]


class TargetConfig(Strict):
    """Base of every target kind's model: the guest (for kinds that boot one), and what the VM
    gets from the host: PCI devices passed through (bound to vfio-pci for the run, with the rest
    of their IOMMU group) and a virtiofs share."""

    guest: Guest
    pci: list[PciAddress] = Field(default_factory=list,
                                  description="PCI devices to pass through, DDDD:BB:DD.F (lspci -D)")
    virtiofs: Virtiofs | None = None

    @field_validator("pci")
    @classmethod
    def _pci(cls, v: list[str]) -> list[str]:
        dup = sorted({a for a in v if v.count(a) > 1})
        if dup:
            raise ValueError(f"{', '.join(dup)} listed twice")
        return v

    def guest_ssh_params(self, host_name: str) -> SSHParams:
        g = self.guest
        return SSHParams(
            name=f"{host_name}/guest",
            host=g.address,
            port=g.port,
            user=g.user,
            key_files=(os.path.expanduser(g.key),) if g.key else (),
            host_keys=(g.host_key,) if g.host_key else (),
            connect_timeout=10.0,
        )
