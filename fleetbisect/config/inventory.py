"""The inventory: which hosts exist, how to reach them, and what boots the kernel on each.

    hosts:
      prime-radiant:
        ssh: {address: prime-radiant.lab, user: root}     # or {alias: prime-radiant}
        work_dir: /var/tmp/fleetbisect
        target:
          kind: qemu
          guest: {address: 127.0.0.1, port: 10022, host_key: /etc/fleetbisect/guest_key.pub}

An inventory is one or more YAML files (a directory means every *.yaml/*.yml in it). A host
may be defined once only; a second definition is an error naming both files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from ..errors import ConfigError, UserError
from ..remote.base import SSHParams
from .loader import Seconds, Strict, read_yaml, validate

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SSH(Strict):
    """How to reach a machine. Secrets never live here: keys are files or the ssh-agent."""

    address: str | None = None
    alias: str | None = None  # a Host entry of ~/.ssh/config; explicit fields win over it
    ssh_config: str | None = None  # an ssh_config file read instead of ~/.ssh/config
    port: int | None = Field(default=None, ge=1, le=65535)
    user: str | None = None
    key: str | None = None  # private key file; default: ssh-agent and ~/.ssh/id_*
    known_hosts: str | None = None  # default: ~/.ssh/known_hosts
    connect_timeout: Seconds = 10.0
    keepalive: Seconds = 5.0

    def params(self, name: str, host_keys: tuple[str, ...] = ()) -> SSHParams:
        if not (self.address or self.alias):
            raise UserError(f"{name}: set ssh.address or ssh.alias")
        return SSHParams(
            name=name,
            host=self.address,
            port=self.port,
            user=self.user,
            alias=self.alias,
            ssh_config=os.path.expanduser(self.ssh_config) if self.ssh_config else None,
            key_files=(os.path.expanduser(self.key),) if self.key else (),
            known_hosts=(os.path.expanduser(self.known_hosts),) if self.known_hosts else (),
            host_keys=host_keys,
            connect_timeout=self.connect_timeout,
            keepalive=self.keepalive,
        )


class Guest(Strict):
    """How the controller reaches the VM's sshd once it boots.

    `via: direct` connects to address:port from the controller (the port QEMU forwards, or a
    bridged guest address); `via: host` tunnels through the host's SSH connection
    (direct-tcpip), for guests only the host can see. The guest is recreated every step, so
    its host key is fixed in the image (`host_key`: a .pub file or the key line) and checked.
    """

    address: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    via: Literal["direct", "host"] = "host"
    user: str = "root"
    key: str | None = None
    host_key: str

    @field_validator("host_key")
    @classmethod
    def _key_line_or_file(cls, v: str) -> str:
        v = v.strip()
        if v.startswith(("ssh-", "ecdsa-", "sk-")):
            return v
        path = Path(os.path.expanduser(v))
        if not path.is_file():
            raise ValueError(f"{v!r} is neither a public key line nor a readable .pub file")
        return path.read_text().strip()


class QemuTarget(Strict):
    kind: Literal["qemu"]
    qemu: str = "qemu-system-x86_64"
    machine: str = "q35"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    guest: Guest

    def guest_ssh_params(self, host_name: str) -> SSHParams:
        g = self.guest
        return SSHParams(
            name=f"{host_name}/guest",
            host=g.address,
            port=g.port,
            user=g.user,
            key_files=(os.path.expanduser(g.key),) if g.key else (),
            host_keys=(g.host_key,),
            connect_timeout=10.0,
        )


class Host(Strict):
    name: SkipJsonSchema[str] = ""  # filled in from the key
    ssh: SSH
    work_dir: str = "/var/tmp/fleetbisect"
    target: QemuTarget
    source: SkipJsonSchema[str] = ""  # file it came from, for messages

    @field_validator("work_dir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must be an absolute path on the host")
        return v.rstrip("/") or "/"

    def ssh_params(self) -> SSHParams:
        return self.ssh.params(self.name)


class _File(Strict):
    hosts: dict[str, dict] = Field(default_factory=dict)


class InventoryFile(Strict):
    """One inventory file, as published in inventory/schema.json."""

    hosts: dict[str, Host] = Field(default_factory=dict)


class Inventory:
    def __init__(self, hosts: dict[str, Host]):
        self.hosts = hosts

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            known = ", ".join(sorted(self.hosts)) or "none"
            raise UserError(f"unknown host {name!r} (the inventory has: {known})") from None


def inventory_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(x for x in p.iterdir() if x.suffix in (".yaml", ".yml") and x.is_file())
        elif p.exists():
            files.append(p)
        else:
            raise ConfigError([f"{p}: no such inventory file or directory"])
    return files


def load_inventory(paths: list[Path]) -> Inventory:
    """Load and validate every file; all problems of all files are reported at once."""
    import re

    hosts: dict[str, Host] = {}
    problems: list[str] = []
    for path in inventory_files(paths):
        try:
            data, lines = read_yaml(path)
            doc = validate(_File, data if data is not None else {}, path, lines)
        except ConfigError as e:
            problems += e.problems
            continue
        for name, raw in doc.hosts.items():
            line = lines.line(("hosts", name)) or 1
            if not re.match(NAME, str(name)):
                problems.append(f"{path}:{line} hosts.{name}: a host name is letters, digits, '.', '_', '-'")
                continue
            if name in hosts:
                problems.append(f"{path}:{line} hosts.{name}: already defined in {hosts[name].source}")
                continue
            if not isinstance(raw, dict):
                problems.append(f"{path}:{line} hosts.{name}: expected a mapping of ssh, work_dir, target")
                continue
            try:
                hosts[name] = validate(
                    Host, {**raw, "name": str(name), "source": str(path)}, path, lines, ("hosts", name)
                )
            except ConfigError as e:
                problems += e.problems
    if problems:
        raise ConfigError(problems)
    return Inventory(hosts)
