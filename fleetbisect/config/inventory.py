"""The inventory: which hosts exist, how to reach them, and what boots the kernel on each.

    hosts:
      prime-radiant:
        ssh: {address: prime-radiant.lab, user: root}     # or {alias: prime-radiant}
        work_dir: /var/tmp/fleetbisect
        target:
          kind: qemu
          guest: {address: 127.0.0.1, port: 10022, host_key: /etc/fleetbisect/guest_key.pub}

    groups:
      rack1: [prime-radiant, trantor]       # `fleetbisect run --group rack1`

An inventory is one or more YAML files (a directory means every *.yaml/*.yml in it). A host
may be defined once only; a second definition is an error naming both files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from ..errors import ConfigError, UserError
from ..remote.base import SSHParams
from ..targets import config_models
from .loader import Int, Lines, Problem, Seconds, Strict, by_kind, read_yaml, sort_problems, validate
from .target import existing_file

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


def _absolute(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError("must be an absolute path on the host")
    return v.rstrip("/") or "/"


class BuildHost(Strict):
    """A machine that builds the kernels (stages/remotebuild.py): each commit is pushed to a
    bare repository under `work_dir` with git over SSH, built in a worktree there that stays
    between steps (incremental make), and its artifacts are pulled back."""

    name: SkipJsonSchema[str] = ""  # filled in from the key
    ssh: SSH
    work_dir: str = "/var/tmp/fleetbisect-build"
    source: SkipJsonSchema[str] = ""
    # When the builder is the test host itself: its blob store (WORK_DIR/blobs), where the build
    # leaves the kernel and initrd, so that the push stage finds them there and sends nothing.
    blobs: SkipJsonSchema[str | None] = None

    _work_dir = field_validator("work_dir")(_absolute)

    def ssh_params(self) -> SSHParams:
        return self.ssh.params(self.name)


SLOT = "#"  # "prime-radiant#2": the second VM slot of prime-radiant (never in an inventory name)


def path_name(host: str) -> str:
    """A host's name as a directory name: no `#`, which starts a comment in the Makefile
    fragments a kernel build writes (a tree under such a directory would build wrong)."""
    return host.replace(SLOT, "+")


class Host(Strict):
    name: SkipJsonSchema[str] = ""  # filled in from the key
    ssh: SSH
    work_dir: str = "/var/tmp/fleetbisect"
    # How many steps the host runs at once, each its own VM (kind: qemu): a run on it tests that
    # many commits side by side, as a fleet of that many hosts would. Slot K > 1 lives in
    # WORK_DIR/slot-K (its own lease, blobs and VM) and forwards the guest's port + K - 1.
    slots: int = Int(1, 32, default=1)
    # Where this host's kernels are built: a `build_hosts` entry, or a host's own name (a box
    # that builds its own kernel). Default: on the controller.
    build_on: str | None = Field(None, pattern=NAME)
    target: by_kind(*config_models())  # one model per target kind, chosen by `kind`
    source: SkipJsonSchema[str] = ""  # file it came from, for messages
    builder: SkipJsonSchema[BuildHost | None] = None  # `build_on` resolved by the loader

    _work_dir = field_validator("work_dir")(_absolute)

    @model_validator(mode="after")
    def _slots_fit(self):
        if self.slots == 1:
            return self
        if self.target.kind != "qemu":
            raise ValueError(f"slots: {self.slots} needs target kind qemu (a {self.target.kind} target is "
                             "one machine or one domain)")
        port = self.target.guest.port
        if port is not None and port + self.slots - 1 > 65535:
            raise ValueError(f"slots: {self.slots} forwards guest ports {port}..{port + self.slots - 1}, "
                             "past 65535")
        return self

    def ssh_params(self) -> SSHParams:
        return self.ssh.params(self.name)

    def slot(self, k: int) -> "Host":
        """This host's VM slot `k` (1 is the host as written) as a host of its own."""
        if not 1 <= k <= self.slots:
            raise UserError(f"{self.name} has {self.slots} slot(s), not {k}")
        if k == 1:
            return self
        guest = self.target.guest
        if guest.port is not None:
            guest = guest.model_copy(update={"port": guest.port + k - 1})
        return self.model_copy(update={
            "name": f"{self.name}{SLOT}{k}", "work_dir": f"{self.work_dir.rstrip('/')}/slot-{k}", "slots": 1,
            "target": self.target.model_copy(update={"guest": guest}),
        })

    def slot_hosts(self) -> list["Host"]:
        """Every VM slot of this host, each a host to run steps on."""
        return [self.slot(k) for k in range(1, self.slots + 1)]


class InventoryFile(Strict):
    """One inventory file, as published in inventory/schema.json."""

    hosts: dict[Annotated[str, StringConstraints(pattern=NAME)], Host] = Field(
        default_factory=dict, json_schema_extra={"additionalProperties": False})
    build_hosts: dict[Annotated[str, StringConstraints(pattern=NAME)], BuildHost] = Field(
        default_factory=dict, json_schema_extra={"additionalProperties": False})
    # Named sets of hosts for `run --group NAME` (members are hosts of any inventory file).
    groups: dict[Annotated[str, StringConstraints(pattern=NAME)],
                 list[Annotated[str, StringConstraints(pattern=NAME)]]] = Field(
        default_factory=dict, json_schema_extra={"additionalProperties": False})


class Inventory:
    def __init__(self, hosts: dict[str, Host], groups: dict[str, list[str]] | None = None):
        self.hosts = hosts
        self.groups = groups or {}

    def group(self, name: str) -> list[Host]:
        try:
            return [self.hosts[h] for h in self.groups[name]]
        except KeyError:
            known = ", ".join(sorted(self.groups)) or "none"
            raise UserError(f"unknown group {name!r} (the inventory has: {known})") from None

    def host(self, name: str) -> Host:
        """A host by name; `NAME#K` is its VM slot K (`slots:`), as a run's journal names it."""
        base, sep, k = name.partition(SLOT)
        if sep:
            if not k.isdigit():
                raise UserError(f"unknown host {name!r}: a slot is {base}{SLOT}<number>")
            return self.host(base).slot(int(k))
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
    build_hosts: dict[str, BuildHost] = {}
    groups: dict[str, tuple[Path, Lines, list]] = {}
    problems: list[str] = []
    where: dict[str, tuple[Path, int | None]] = {}  # host -> file and line of its build_on
    for path in inventory_files(paths):
        try:
            data, lines = read_yaml(path)
        except ConfigError as e:
            problems += e.problems
            continue
        problems += _load_file(path, data, lines, hosts, build_hosts)
        problems += _load_groups(path, data, lines, groups)
        for name, host in hosts.items():
            if host.build_on and name not in where and host.source == str(path):
                where[name] = (path, lines.line(("hosts", name, "build_on")))
    for name, (path, lines, members) in groups.items():  # members may live in any file
        for i, member in enumerate(members):
            if member not in hosts:
                loc = ("groups", name, i)
                problems.append(Problem(path, lines.line(loc) or lines.line(loc[:2]), loc,
                                        f"no host {member!r} in the inventory"))
    if not problems:
        hosts, problems = _resolve_builders(hosts, build_hosts, where)
    if problems:
        raise ConfigError(sort_problems(problems))
    return Inventory(hosts, {name: list(m) for name, (_, _, m) in groups.items()})


def _load_groups(path: Path, data, lines: Lines, groups: dict) -> list[str]:
    """The `groups:` of one file into `groups` (name -> (file, lines, members)); its problems."""
    raw = data.get("groups") if isinstance(data, dict) else None
    if raw is None:
        return []
    if not isinstance(raw, dict):
        return [Problem(path, lines.line(("groups",)), ("groups",), "expected a mapping of group names")]
    problems = []
    for name, members in raw.items():
        loc = ("groups", name)
        line = lines.line(loc)
        if not isinstance(name, str) or not re.match(NAME, name):
            problems.append(Problem(path, line, loc, "a group name is letters, digits, '.', '_', '-'"))
        elif name in groups:
            problems.append(Problem(path, line, loc, f"already defined in {groups[name][0]}"))
        elif not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            problems.append(Problem(path, line, loc, "expected a list of host names"))
        elif len(set(members)) != len(members):
            problems.append(Problem(path, line, loc, "a host is listed twice"))
        else:
            groups[name] = (path, lines, members)
    return problems


def _resolve_builders(hosts: dict[str, Host], build_hosts: dict[str, BuildHost],
                      where: dict[str, tuple[Path, int | None]]) -> tuple[dict[str, Host], list[str]]:
    """Each host's `build_on` as the BuildHost it names (any file of the inventory may define
    it). A host named there builds in WORK_DIR/build on itself."""
    problems: list[str] = []
    out = dict(hosts)
    for name, host in hosts.items():
        if not host.build_on:
            continue
        builder = build_hosts.get(host.build_on)
        if builder is None and host.build_on in hosts:
            other = hosts[host.build_on]
            builder = BuildHost(name=other.name, ssh=other.ssh, work_dir=other.work_dir.rstrip("/") + "/build",
                                source=other.source,
                                blobs=other.work_dir.rstrip("/") + "/blobs" if other is host else None)
        if builder is None:
            known = ", ".join(sorted(build_hosts)) or "none"
            path, line = where[name]
            problems.append(Problem(path, line, ("hosts", name, "build_on"),
                                    f"no build host {host.build_on!r} (build_hosts has: {known}; "
                                    "or name a host to build on it)"))
            continue
        out[name] = host.model_copy(update={"builder": builder})
    return out, problems


SECTIONS = {"hosts": (Host, "host", "ssh, work_dir, target"),
            "build_hosts": (BuildHost, "build host", "ssh, work_dir")}


def _load_file(path: Path, data, lines: Lines, hosts: dict[str, Host],
               build_hosts: dict[str, BuildHost]) -> list[str]:
    """The hosts and build hosts of one file into `hosts` and `build_hosts`; its problems."""
    if data is None:
        return []
    if not isinstance(data, dict):
        return [Problem(path, lines.line(()) or 1, (), "expected a mapping with `hosts:`")]
    problems = [Problem(path, lines.line((key,)), (key,),
                        "unknown field (a typo?) - an inventory file has `hosts:`, `build_hosts:` and `groups:`")
                for key in data if key not in SECTIONS and key != "groups"]
    for section, found in (("hosts", hosts), ("build_hosts", build_hosts)):
        model, what, fields = SECTIONS[section]
        entries = data.get(section)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            problems.append(Problem(path, lines.line((section,)), (section,), f"expected a mapping of {what} names"))
            continue
        for name, raw in entries.items():
            loc = (section, name)
            line = lines.line(loc)
            if not isinstance(name, str) or not re.match(NAME, name):
                problems.append(Problem(path, line, loc, f"a {what} name is letters, digits, '.', '_', '-'"))
            elif name in found:
                problems.append(Problem(path, line, loc, f"already defined in {found[name].source}"))
            elif not isinstance(raw, dict):
                problems.append(Problem(path, line, loc, f"expected a mapping of {fields}"))
            else:
                try:
                    found[name] = validate(model, {**raw, "name": name, "source": str(path)}, path, lines, loc)
                except ConfigError as e:
                    problems += e.problems
    return problems
