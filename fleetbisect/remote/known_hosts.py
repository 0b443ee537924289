"""A known_hosts reader that reads what OpenSSH reads and skips what OpenSSH skips.

paramiko's HostKeys.load raises on a line it cannot parse (InvalidHostKey) and does not know
`@revoked`, so one odd line in a user's file took every connection down. Here, as in OpenSSH
(hostfile.c):
- comments, blank lines, malformed lines and key types paramiko cannot check are skipped;
- `@cert-authority` lines are skipped (fleetbisect does not do host certificates, so a CA line
  can never vouch for a plain host key);
- host fields are a comma list of patterns (`*`, `?`, `!negation`, `[host]:port`), or one
  hashed name `|1|salt|hash` (HMAC-SHA1 of the name, as `HashKnownHosts yes` writes it);
- `@revoked` keys are refused for the hosts their line matches, whatever other lines say.

    keys = HostKeys.read(["~/.ssh/known_hosts"], "[127.0.0.1]:2222")
    keys.accepted   # [(source, PKey)]: keys that may answer for that name
    keys.revoked    # [(source, PKey)]: keys that must never be accepted for it
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Iterable

import paramiko

MAX_FILE = 16 << 20  # a known_hosts file larger than this is not read whole (OpenSSH has no cap)


@dataclass(frozen=True)
class Entry:
    source: str  # "path:line"
    hosts: str  # the host field as written
    key: paramiko.PKey
    revoked: bool = False

    def matches(self, name: str) -> bool:
        return host_matches(self.hosts, name)


@dataclass
class HostKeys:
    """The keys known for one host name, read from known_hosts files."""

    name: str
    accepted: list[tuple[str, paramiko.PKey]] = field(default_factory=list)
    revoked: list[tuple[str, paramiko.PKey]] = field(default_factory=list)

    @classmethod
    def read(cls, paths: Iterable[str], name: str) -> "HostKeys":
        """Keys for `name` (`host`, or `[host]:port` when the port is not 22) in `paths`;
        a missing file counts as empty. Raises OSError for a file that exists but cannot be
        read."""
        found = cls(name)
        for path in paths:
            for entry in parse_file(path):
                if entry.matches(name):
                    (found.revoked if entry.revoked else found.accepted).append(
                        (entry.source.rsplit(":", 1)[0], entry.key))
        return found

    def revoked_match(self, key: paramiko.PKey) -> str | None:
        """Where `key` is revoked for this name, or None."""
        return next((src for src, k in self.revoked if k == key), None)


def parse_file(path: str) -> list[Entry]:
    path = os.path.expanduser(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE)
    except FileNotFoundError:
        return []
    entries = []
    for number, raw in enumerate(data.splitlines(), 1):
        entry = parse_line(raw.decode("utf-8", "replace"), f"{path}:{number}")
        if entry is not None:
            entries.append(entry)
    return entries


def parse_line(line: str, source: str = "") -> Entry | None:
    """One known_hosts line as an Entry, or None for what OpenSSH would skip."""
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    revoked = False
    if fields[0].startswith("@"):
        if fields[0] == "@revoked":
            revoked = True
        else:  # @cert-authority, or a marker OpenSSH does not know either
            return None
        fields = fields[1:]
    if len(fields) < 3:
        return None
    hosts, key_type, blob = fields[0], fields[1], fields[2]
    try:
        key_bytes = base64.b64decode(blob, validate=True)
        key = paramiko.PKey.from_type_string(key_type, key_bytes)
    except Exception:  # noqa: BLE001 - garbage, a truncated key, a type paramiko cannot check
        return None  # (sk-*, certificates: UnknownKeyType is no SSHException): skipped
    if key.asbytes() != key_bytes or key.get_name() != key_type:
        return None  # truncated or padded (paramiko reads missing bytes as zeros), or the blob
        # is of another type than the line says
    return Entry(source, hosts, key, revoked)


def host_matches(hosts: str, name: str) -> bool:
    """OpenSSH's match_hostname: any positive pattern matches and no negated one does."""
    if hosts.startswith("|"):
        return _hashed_matches(hosts, name)
    name = name.lower()
    matched = False
    for pattern in hosts.lower().split(","):
        negated = pattern.startswith("!")
        if negated:
            pattern = pattern[1:]
        if pattern and _glob(pattern, name):
            if negated:
                return False
            matched = True
    return matched


def _glob(pattern: str, name: str) -> bool:
    """Only * and ? are special in OpenSSH patterns: [ and ] (of [host]:port) are literal."""
    escaped = "".join(f"[{ch}]" if ch in "[]" else ch for ch in pattern)
    return fnmatch.fnmatchcase(name, escaped)


def _hashed_matches(hosts: str, name: str) -> bool:
    parts = hosts.split("|")
    if len(parts) != 4 or parts[1] != "1":
        return False
    try:
        salt = base64.b64decode(parts[2], validate=True)
        expected = base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        return False
    digest = hmac.new(salt, name.lower().encode(), hashlib.sha1).digest()
    return hmac.compare_digest(digest, expected)
