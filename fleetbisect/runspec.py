"""What a run was started with (the journal's first event) and the checks `resume` makes on it."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .lease import new_token


def controller() -> dict:
    """Who drives the run, so `status` can tell a running run from a dead one. The token is
    this controller's own (a new one per `run`/`resume`): the run-directory lock and the host
    lease carry it, so a second controller of the same run is told apart from this one."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": new_token()}


# Transport tuning, free to change between `run` and `resume`: it does not change which machine
# or VM the verdicts come from.
_HOST_TUNING = ("ssh.connect_timeout", "ssh.keepalive")


def host_fingerprint(host) -> dict[str, str]:
    """A digest per field of the host's validated inventory entry (never the values), so that
    `resume` can refuse a changed entry and name what changed."""
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif prefix not in _HOST_TUNING:
            out[prefix] = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]

    walk("", json.loads(host.model_dump_json(exclude={"source", "name"})))
    return out


@dataclass
class RunSpec:
    """What a run was started with; stored in the journal's first event."""

    run_id: str
    repo: Path
    good: str
    bad: str
    host: str
    inventory: list[Path]
    playbook: Path
    playbook_digest: str
    check_endpoints: bool = True
    hooks: dict[str, list[str]] = field(default_factory=dict)  # from the command line
    host_fingerprint: dict[str, str] | None = None  # None: a run started before it was kept
    # Several hosts or a search of its own (fleet.py): every host, and the search's name.
    hosts: list[str] = field(default_factory=list)  # empty: just `host`
    search: str = "bisect"
    host_fingerprints: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "run_id": self.run_id, "repo": str(self.repo), "good": self.good, "bad": self.bad,
            "host": self.host, "inventory": [str(p) for p in self.inventory],
            "playbook": str(self.playbook), "playbook_digest": self.playbook_digest,
            "check_endpoints": self.check_endpoints, "hooks": self.hooks,
            "host_fingerprint": self.host_fingerprint, "hosts": self.hosts, "search": self.search,
            "host_fingerprints": self.host_fingerprints,
        }

    @classmethod
    def from_json(cls, d: dict) -> "RunSpec":
        return cls(
            d["run_id"], Path(d["repo"]), d["good"], d["bad"], d["host"],
            [Path(p) for p in d["inventory"]], Path(d["playbook"]), d["playbook_digest"],
            d.get("check_endpoints", True), d.get("hooks", {}), d.get("host_fingerprint"),
            list(d.get("hosts") or []), d.get("search", "bisect"), dict(d.get("host_fingerprints") or {}),
        )

    @property
    def host_names(self) -> list[str]:
        return self.hosts or [self.host]


def _same_host(spec: RunSpec, host) -> None:
    """Refuse an inventory entry that changed since the run started: the verdicts so far came
    from the machine and VM it described."""
    was = spec.host_fingerprints.get(host.name, spec.host_fingerprint if host.name == spec.host else None)
    if was is None:
        return
    now = host_fingerprint(host)
    changed = sorted(k for k in {*now, *was} if now.get(k) != was.get(k))
    if changed:
        raise UserError(
            f"{host.source or 'the inventory'}: host {spec.host} changed since the run started "
            f"({', '.join(changed)}): the verdicts so far came from the machine and VM it described. "
            f"Restore the entry to resume, or start a new run (`fleetbisect run`) for the new one"
        )
