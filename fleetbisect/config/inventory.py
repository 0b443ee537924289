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

import base64
import binascii
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from ..errors import ConfigError, UserError
from ..remote.base import SSHParams
from .loader import Int, Lines, Problem, Seconds, Strict, read_yaml, sort_problems, validate

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SSH(Strict):
    """How to reach a machine. Secrets never live here: keys are files or the ssh-agent."""

    model_config = ConfigDict(**Strict.model_config,
                              json_schema_extra={"anyOf": [{"required": ["address"]}, {"required": ["alias"]}]})

    address: str | None = None
    alias: str | None = None  # a Host entry of ~/.ssh/config; explicit fields win over it
    ssh_config: str | None = None  # an ssh_config file read instead of ~/.ssh/config
    port: int | None = Int(1, 65535, None)
    user: str | None = None
    key: str | None = None  # private key file; default: ssh-agent and ~/.ssh/id_*
    known_hosts: str | None = None  # default: ~/.ssh/known_hosts
    connect_timeout: Seconds = 10.0
    keepalive: Seconds = 5.0

    @field_validator("key", "known_hosts", "ssh_config")
    @classmethod
    def _files(cls, v: str | None) -> str | None:
        return existing_file(v)

    @model_validator(mode="after")
    def _reachable(self):
        if not (self.address or self.alias):
            raise ValueError("set ssh.address, or ssh.alias (a Host of your ssh_config)")
        return self

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
    port: int = Int(1, 65535)
    via: Literal["direct", "host"] = "host"
    user: str = "root"
    key: str | None = None
    host_key: str

    @field_validator("key")
    @classmethod
    def _files(cls, v: str | None) -> str | None:
        return existing_file(v)

    @field_validator("host_key")
    @classmethod
    def _key_line_or_file(cls, v: str) -> str:
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


class InventoryFile(Strict):
    """One inventory file, as published in inventory/schema.json."""

    hosts: dict[Annotated[str, StringConstraints(pattern=NAME)], Host] = Field(
        default_factory=dict, json_schema_extra={"additionalProperties": False})


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
            raise ConfigError([Problem(p, None, None, "no such inventory file or directory")])
    return files


def load_inventory(paths: list[Path]) -> Inventory:
    """Load and validate every file; all problems of all files are reported at once, by file
    and line: a broken host or an unknown key hides nothing else."""
    hosts: dict[str, Host] = {}
    problems: list[str] = []
    for path in inventory_files(paths):
        try:
            data, lines = read_yaml(path)
        except ConfigError as e:
            problems += e.problems
            continue
        problems += _load_file(path, data, lines, hosts)
    if problems:
        raise ConfigError(sort_problems(problems))
    return Inventory(hosts)


def _load_file(path: Path, data, lines: Lines, hosts: dict[str, Host]) -> list[str]:
    """The hosts of one file into `hosts`; its problems."""
    if data is None:
        return []
    if not isinstance(data, dict):
        return [Problem(path, lines.line(()) or 1, (), "expected a mapping with `hosts:`")]
    problems = [Problem(path, lines.line((key,)), (key,), "unknown field (a typo?) - an inventory file has `hosts:`")
                for key in data if key != "hosts"]
    entries = data.get("hosts")
    if entries is None:
        return problems
    if not isinstance(entries, dict):
        return [*problems, Problem(path, lines.line(("hosts",)), ("hosts",), "expected a mapping of host names")]
    for name, raw in entries.items():
        loc = ("hosts", name)
        line = lines.line(loc)
        if not isinstance(name, str) or not re.match(NAME, name):
            problems.append(Problem(path, line, loc, "a host name is letters, digits, '.', '_', '-'"))
        elif name in hosts:
            problems.append(Problem(path, line, loc, f"already defined in {hosts[name].source}"))
        elif not isinstance(raw, dict):
            problems.append(Problem(path, line, loc, "expected a mapping of ssh, work_dir, target"))
        else:
            try:
                hosts[name] = validate(Host, {**raw, "name": name, "source": str(path)}, path, lines, loc)
            except ConfigError as e:
                problems += e.problems
    return problems
