"""What every target kind's inventory entry shares: how the guest is reached and who it is.

Each kind's own model lives with its module in targets/ (e.g. `targets.qemu.QemuConfig`) and
derives from `TargetConfig`; the inventory's `target:` is the union of them, chosen by `kind`.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from ..remote.base import SSHParams
from .loader import Int, Strict, StrictBool


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




class TargetConfig(Strict):
    """Base of every target kind's model: the guest (for kinds that boot one)."""

    guest: Guest

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
