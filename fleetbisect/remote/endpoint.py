"""Where to connect, after ssh_config and defaults were applied; and whose host key to accept.

Both ways of connecting, paramiko (ssh.py) and the OpenSSH scp path for big uploads
(openssh.py), start from the same resolved `Endpoint` and check host keys with the same
`expected_keys`, so they can never disagree about where they connect or which key they trust.

ssh_config (`SSHParams.alias`, or any host with `SSHParams.ssh_config`): the file given, or
~/.ssh/config then /etc/ssh/ssh_config. HostName, Port, User, IdentityFile, UserKnownHostsFile
and ProxyJump are honoured; explicit params win. ProxyJump (`[user@]host[:port]`, a comma chain,
or `ssh://` URIs) makes each hop an Endpoint of its own, resolved through the same file, its
host key checked; a hop without IdentityFile/UserKnownHostsFile of its own uses the host's
configured key and known_hosts files. ProxyCommand is refused: running a user's command as a
transport is not something fleetbisect can bound with a deadline or check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import paramiko

from ..errors import UserError
from .base import HostKeyError, SSHParams, host_key_line
from .known_hosts import HostKeys, parse_line

DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts")
DEFAULT_SSH_CONFIGS = ("~/.ssh/config", "/etc/ssh/ssh_config")
MAX_HOPS = 8


@dataclass(frozen=True)
class Endpoint:
    """One SSH server to reach: address, login, keys, and the hops in front of it."""

    host: str
    port: int
    user: str
    key_files: tuple[str, ...]
    known_hosts: tuple[str, ...]
    use_agent: bool = True
    host_keys: tuple[str, ...] = ()  # configured key lines: checked instead of known_hosts
    jumps: tuple["Endpoint", ...] = ()  # ProxyJump hops, first hop first
    role: str = ""  # "" for the host itself, "jump host NAME" for a hop (for messages)

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH files the host key under: `[host]:port` unless the port is 22."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def prefix(self) -> str:
        """What to put in front of a message about this endpoint."""
        return f"{self.role} ({self.where}): " if self.role else ""


# --- resolving ----------------------------------------------------------------------------


def resolve(params: SSHParams) -> Endpoint:
    """Apply ssh_config and defaults to `params`. Raises UserError for a config fleetbisect
    cannot honour (ProxyCommand, a missing ssh_config file, no address)."""
    config = _load_config(params) if (params.alias or params.ssh_config) else None
    opts = config.lookup(params.alias or params.host) if config is not None else {}
    _refuse_proxy_command(params, opts, params.alias or params.host or "")
    host = params.host or (opts.get("hostname") if config is not None else None)
    if not host:
        raise UserError(f"{params.name}: no address: set the host's address or an ssh alias")
    keys = tuple(params.key_files) or _identity_files(opts)
    known = tuple(params.known_hosts) or _known_hosts_files(opts)
    target = Endpoint(
        host=host,
        port=int(params.port or opts.get("port") or 22),
        user=params.user or opts.get("user") or _local_user(),
        key_files=keys,
        known_hosts=tuple(os.path.expanduser(k) for k in (known or DEFAULT_KNOWN_HOSTS)),
        use_agent=not params.key_files,
        host_keys=tuple(params.host_keys),
    )
    if config is None or not _jump_specs(opts):
        return target
    return replace(target, jumps=_jump_chain(params, config, _jump_specs(opts), 0))


def _load_config(params: SSHParams) -> paramiko.SSHConfig:
    config = paramiko.SSHConfig()
    if params.ssh_config:
        path = os.path.expanduser(params.ssh_config)
        paths = [path]
        if not os.path.isfile(path):
            raise UserError(f"{params.name}: ssh_config file {path} does not exist")
    else:
        paths = [p for p in map(os.path.expanduser, DEFAULT_SSH_CONFIGS) if os.path.isfile(p)]
    for path in paths:  # the first value found wins, as in OpenSSH: the user's file first
        try:
            with open(path, encoding="utf-8") as f:
                config.parse(f)
        except (OSError, UnicodeError, ValueError, paramiko.ConfigParseError) as e:
            raise UserError(f"{params.name}: cannot read ssh_config {path}: {e}") from None
    return config


def _refuse_proxy_command(params: SSHParams, opts, name: str) -> None:
    if (opts.get("proxycommand") or "none").strip().lower() != "none":
        raise UserError(
            f"{params.name}: ssh_config for {name!r} sets ProxyCommand: ProxyCommand is not "
            f"supported; use ProxyJump"
        )


def _jump_specs(opts) -> list[str]:
    value = (opts.get("proxyjump") or "").strip()
    if not value or value.lower() == "none":
        return []
    return [s.strip() for s in value.split(",") if s.strip()]


def _jump_chain(params: SSHParams, config: paramiko.SSHConfig, specs: list[str],
                depth: int) -> tuple[Endpoint, ...]:
    """The hops of a ProxyJump chain, first first. As in OpenSSH, the first hop's own
    ProxyJump (from the config) puts its hops in front; later hops' own settings are not
    consulted for jumping (the chain given says how to reach them)."""
    hops: list[Endpoint] = []
    for i, spec in enumerate(specs):
        user, name, port = parse_jump(params, spec)
        opts = config.lookup(name)
        _refuse_proxy_command(params, opts, name)
        if i == 0 and _jump_specs(opts):
            if depth + len(specs) >= MAX_HOPS:
                raise UserError(f"{params.name}: ProxyJump chain longer than {MAX_HOPS} hops "
                                f"(a loop in the ssh_config?)")
            hops.extend(_jump_chain(params, config, _jump_specs(opts), depth + len(specs)))
        own_keys = _identity_files(opts)
        keys = own_keys or tuple(params.key_files)
        known = _known_hosts_files(opts) or tuple(params.known_hosts)
        hops.append(Endpoint(
            host=opts.get("hostname") or name,
            port=int(port or opts.get("port") or 22),
            user=user or opts.get("user") or _local_user(),
            key_files=keys,
            known_hosts=tuple(os.path.expanduser(k) for k in (known or DEFAULT_KNOWN_HOSTS)),
            use_agent=bool(own_keys) or not params.key_files,
            role=f"jump host {name}",
        ))
    if len(hops) > MAX_HOPS:
        raise UserError(f"{params.name}: ProxyJump chain longer than {MAX_HOPS} hops")
    return tuple(hops)


def parse_jump(params: SSHParams, spec: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` or `ssh://[user@]host[:port]` -> (user, host, port)."""
    text = spec[len("ssh://"):] if spec.startswith("ssh://") else spec
    user = None
    if "@" in text:
        user, text = text.rsplit("@", 1)
    port: str | None = None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    if not host or (port is not None and not (port.isdigit() and 0 < int(port) < 65536)):
        raise UserError(f"{params.name}: cannot understand ProxyJump {spec!r} "
                        f"(expected [user@]host[:port])")
    return user or None, host, int(port) if port else None


def _identity_files(opts) -> tuple[str, ...]:
    return tuple(os.path.expanduser(k) for k in opts.get("identityfile", []))


def _known_hosts_files(opts) -> tuple[str, ...]:
    return tuple((opts.get("userknownhostsfile") or "").split())


def _local_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


# --- host keys ----------------------------------------------------------------------------


CONFIGURED = "the configured host key"


def expected_keys(name: str, ep: Endpoint) -> tuple[HostKeys, str]:
    """The keys that may (and the revoked ones that must never) answer for `ep`, and where
    the user would fix it. `name` is the inventory name, for errors."""
    label = ep.known_hosts_name
    if ep.host_keys:
        found = HostKeys(label)
        for line in ep.host_keys:
            text = host_key_line(line)
            entry = parse_line(f"{label} {text}")
            if entry is None:
                raise HostKeyError(name, f"{ep.prefix()}cannot parse the configured host key "
                                         f"{text[:40]!r}")
            found.accepted.append((CONFIGURED, entry.key))
        return found, "the host key configured for it (host_keys)"
    try:
        return HostKeys.read(ep.known_hosts, label), ep.known_hosts[0]
    except OSError as e:
        raise HostKeyError(name, f"{ep.prefix()}cannot read known_hosts file "
                                 f"{e.filename or ''}: {e.strerror or e}") from None


def describe(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


def check_host_key(name: str, ep: Endpoint, offered: paramiko.PKey, keys: HostKeys,
                   fix: str) -> None:
    """Raise HostKeyError unless `offered` is one of the expected keys and not revoked."""
    label = ep.known_hosts_name
    revoked_in = keys.revoked_match(offered)
    if revoked_in:
        raise HostKeyError(
            name,
            f"{ep.prefix()}REVOKED host key for {label}: it offered {describe(offered)}, which "
            f"is marked @revoked in {revoked_in}; refusing to connect",
        )
    if any(key == offered for _, key in keys.accepted):
        return
    same_type = [src for src, key in keys.accepted if key.get_name() == offered.get_name()]
    if same_type:
        where = same_type[0]
        hint = (
            f"if the host was really reinstalled, remove the old entry "
            f"(ssh-keygen -R '{label}' -f {where})"
            if where != CONFIGURED else "update the configured host key"
        )
        raise HostKeyError(
            name,
            f"{ep.prefix()}HOST KEY MISMATCH for {label}: it offered {describe(offered)}, which "
            f"differs from the key in {where}; refusing to connect ({hint})",
        )
    raise HostKeyError(
        name,
        f"{ep.prefix()}unknown host key for {label}: it offered {describe(offered)}; after "
        f"checking that fingerprint, add it to {fix} "
        f"(e.g. ssh-keyscan -p {ep.port} {ep.host} >> {fix})",
    )


def known_hosts_lines(ep: Endpoint, alias: str) -> list[str]:
    """known_hosts lines, filed under `alias`, that accept exactly what `check_host_key`
    accepts for `ep` (and revoke what it refuses): for OpenSSH clients, so that they trust no
    more than paramiko (no @cert-authority, no other file)."""
    keys, _ = expected_keys("", ep)
    lines = [f"{alias} {key.get_name()} {key.get_base64()}" for _, key in keys.accepted]
    lines += [f"@revoked {alias} {key.get_name()} {key.get_base64()}" for _, key in keys.revoked]
    return lines

