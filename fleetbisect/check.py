"""`fleetbisect check`: is this host ready for a run? Probes only; changes nothing."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

from .deadline import Deadline
from .errors import FleetbisectError
from .remote.ssh import SSHRemote
from .ui import UI

MIN_FREE_MB = 2048


@dataclass(frozen=True)
class Probe:
    name: str
    ok: bool
    detail: str


# Runs on the host: prints one "name<TAB>ok|fail<TAB>detail" line per probe. Read-only.
_PROBES = r"""
qemu=$1; work=$2; need_mb=$3
if p=$(command -v "$qemu"); then echo "qemu	ok	$p"; else echo "qemu	fail	$qemu not found in PATH"; fi
d=$work; while [ ! -e "$d" ]; do d=$(dirname "$d"); done
if [ -d "$d" ] && [ -w "$d" ]; then echo "work dir	ok	$work (writable: $d)"; else echo "work dir	fail	$d is not a writable directory"; fi
free=$(df -Pk "$d" | awk 'NR==2 {print int($4/1024)}')
if [ "${free:-0}" -ge "$need_mb" ]; then echo "disk	ok	${free} MB free at $d"; else echo "disk	fail	${free:-?} MB free at $d, want $need_mb"; fi
if command -v timeout >/dev/null; then echo "timeout	ok	remote commands are bounded"; else echo "timeout	fail	coreutils timeout missing"; fi
"""


def probe_host(host_cfg, playbook) -> list[Probe]:
    probes: list[Probe] = []
    try:
        with SSHRemote.connect(host_cfg.ssh_params(), deadline=Deadline.after(host_cfg.ssh.connect_timeout + 5)) as host:
            probes.append(Probe("ssh", True, f"connected to {host_cfg.name}"))
            res = host.run(
                ["sh", "-c", _PROBES, "sh", host_cfg.target.qemu, host_cfg.work_dir, str(MIN_FREE_MB)],
                deadline=Deadline.after(30),
            )
            for line in res.stdout.splitlines():
                name, status, detail = (line.split("\t", 2) + ["", ""])[:3]
                probes.append(Probe(name, status == "ok", detail))
    except FleetbisectError as e:
        probes.append(Probe("ssh", False, str(e)))
    return probes


def check_host(host_cfg, playbook, ui: UI) -> bool:
    probes = [Probe("config", True, f"inventory and playbook {playbook.name!r} are valid")]
    probes += probe_host(host_cfg, playbook)
    table = Table(title=f"check {host_cfg.name}", show_header=True)
    for col in ("probe", "", "detail"):
        table.add_column(col)
    for p in probes:
        table.add_row(p.name, "[green]ok[/]" if p.ok else "[red]FAIL[/]", p.detail)
    ui.console.print(table)
    return all(p.ok for p in probes)
