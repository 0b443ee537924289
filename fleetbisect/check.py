"""`fleetbisect check`: is this host ready for a run? Probes only; changes nothing.

Besides the host itself (SSH, QEMU, work dir, disk), it opens the path a step will use to reach
the guest (a host that refuses TCP forwarding would make every boot look like a hang), says how
the running kernel's identity will be checked (or that it will not be), and runs each
reproducer's preflight when a guest happens to answer there.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from rich.markup import escape
from rich.table import Table

from . import targets
from .deadline import Deadline
from .errors import FleetbisectError
from .remote.base import Remote, TunnelRefused
from .remote.local import LocalRemote
from .remote.ssh import SSHRemote
from .reproducers import preflight
from .stages import distcc
from .stages.ready import kernel_identity
from .ui import UI

MIN_FREE_MB = 2048


@dataclass(frozen=True)
class Probe:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # ok, but the user should know (e.g. the kernel is not verified)


# Runs on the host: prints one "name<TAB>ok|fail<TAB>detail" line per probe. Read-only.
_PROBES = r"""
work=$1; need_mb=$2
d=$work; while [ ! -e "$d" ]; do d=$(dirname "$d"); done
if [ -d "$d" ] && [ -w "$d" ]; then echo "work dir	ok	$work (writable: $d)"; else echo "work dir	fail	$d is not a writable directory"; fi
free=$(df -Pk "$d" | awk 'NR==2 {print int($4/1024)}')
if [ "${free:-0}" -ge "$need_mb" ]; then echo "disk	ok	${free} MB free at $d"; else echo "disk	fail	${free:-?} MB free at $d, want $need_mb"; fi
if command -v timeout >/dev/null; then echo "timeout	ok	remote commands are bounded"; else echo "timeout	fail	coreutils timeout missing"; fi
"""
# On a build host, besides the above: what a build there needs.
_BUILD_PROBES = _PROBES + r"""
for tool in git make; do
  if command -v $tool >/dev/null; then echo "$tool	ok	$(command -v $tool)"; else echo "$tool	fail	$tool is not installed"; fi
done
"""


def _script_probes(remote: Remote, script: str, args: list[str], prefix: str = "") -> list[Probe]:
    """Run a probe script (one "name<TAB>ok|fail<TAB>detail" line per probe)."""
    res = remote.run(["sh", "-c", script, "sh", *args], deadline=Deadline.after(30))
    probes = []
    for line in res.stdout.splitlines():
        name, status, detail = (line.split("\t", 2) + ["", ""])[:3]
        probes.append(Probe(prefix + name, status == "ok", detail))
    return probes


def probe_build(host_cfg, playbook) -> list[Probe]:
    """Where the kernels are built: the build host (`build_on`: SSH, work dir, disk, git, make)
    and the playbook's distcc daemons as seen from there (reachable, and a real compile goes
    through each); nothing when the build is local without distcc."""
    builder = getattr(host_cfg, "builder", None)
    spec = getattr(getattr(playbook, "build", None), "distcc", None)
    if builder is None:
        return [Probe(*p) for p in distcc.probe(spec, LocalRemote(), Deadline.after(120))] if spec else []
    probes = []
    try:
        with SSHRemote.connect(builder.ssh_params(), deadline=Deadline.after(builder.ssh.connect_timeout + 5)) as remote:
            probes.append(Probe("build host", True, f"connected to {builder.name}, builds in {builder.work_dir}"))
            probes += _script_probes(remote, _BUILD_PROBES, [builder.work_dir, str(MIN_FREE_MB)], "build host ")
            if spec:
                probes += [Probe(n, ok, f"from {builder.name}: {d}") for n, ok, d in
                           distcc.probe(spec, remote, Deadline.after(120))]
    except FleetbisectError as e:
        probes.append(Probe("build host", False, str(e)))
    return probes


def identity_probe(playbook) -> Probe:
    level, why = kernel_identity(playbook)
    label = {"verified": "verified", "release-only": "release only", "not-verified": "NOT verified"}[level]
    return Probe("kernel identity", True, f"{label}: {why}", warning=level != "verified")


def probe_guest_path(host: Remote, host_cfg, playbook) -> list[Probe]:
    """Open the way a step reaches the guest; when a guest answers there, log in and run the
    reproducers' preflights against it."""
    g = host_cfg.target.guest
    where = f"{g.address}:{g.port}" + (" through the host" if g.via == "host" else " from here")
    try:
        if g.via == "host":
            stream = host.open_tunnel(g.address, g.port, Deadline.after(15))
        else:
            stream = socket.create_connection((g.address, g.port), timeout=5)
    except TunnelRefused as e:
        return [Probe("guest path", False, str(e))]
    except (FleetbisectError, OSError) as e:
        return [Probe("guest path", True, f"{where}: open, no guest listens now ({e}); the "
                      "reproducers' preflights run at each step")]
    probes = [Probe("guest path", True, f"{where}: a guest answers")]
    try:
        with SSHRemote.connect(host_cfg.target.guest_ssh_params(host_cfg.name),
                               deadline=Deadline.after(15), sock=stream) as guest:
            for spec in playbook.reproducers:
                problem = preflight(spec, guest, Deadline.after(30))
                probes.append(Probe(f"reproducer {spec.kind}", problem is None,
                                    problem or "its preflight passed in the running guest"))
    except FleetbisectError as e:
        stream.close()
        probes.append(Probe("reproducers", True, f"could not log in to the guest running now ({e}); "
                            "the preflights run at each step", warning=True))
    return probes


def probe_host(host_cfg, playbook) -> list[Probe]:
    probes: list[Probe] = []
    try:
        with SSHRemote.connect(host_cfg.ssh_params(), deadline=Deadline.after(host_cfg.ssh.connect_timeout + 5)) as host:
            probes.append(Probe("ssh", True, f"connected to {host_cfg.name}"))
            probes += _script_probes(host, _PROBES, [
                host_cfg.work_dir, str(targets.select(host_cfg.target.kind).min_free_mb or MIN_FREE_MB)])
            for c in targets.for_host(host_cfg, playbook).probes(host, Deadline.after(60)):
                probes.append(Probe(c.name, c.ok, c.detail))
            guest = host_cfg.target.guest  # None for a bare-metal box: it is the host
            if not playbook.console_only and guest is not None and guest.reach == "ssh":
                probes += probe_guest_path(host, host_cfg, playbook)
    except FleetbisectError as e:
        probes.append(Probe("ssh", False, str(e)))
    return probes


def check_host(host_cfg, playbook, ui: UI) -> bool:
    probes = [Probe("config", True, f"inventory and playbook {playbook.name!r} are valid"),
              identity_probe(playbook)]
    probes += probe_host(host_cfg, playbook)
    probes += probe_build(host_cfg, playbook)
    table = Table(title=f"check {host_cfg.name}", show_header=True)
    for col in ("probe", "", "detail"):
        table.add_column(col)
    for p in probes:
        mark = "[red]FAIL[/]" if not p.ok else "[yellow]WARN[/]" if p.warning else "[green]ok[/]"
        table.add_row(escape(p.name), mark, escape(p.detail))  # host text: `[/dev/sda1]` is no markup
        ui.event("probe", name=p.name, ok=p.ok, warning=p.warning, detail=p.detail)
    ui.console.print(table)
    return all(p.ok for p in probes)
