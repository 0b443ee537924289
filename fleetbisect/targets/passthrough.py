"""PCI passthrough: the devices a VM takes from its host, and everything that shares their IOMMU
group (a group goes to vfio-pci whole, or not at all; PCI bridges in it stay where they are).

Three host scripts, each run as ONE `sh -c SCRIPT sh ARGS...` through `Remote.run`, with the
sysfs root, the state file and the addresses as argv words (never pasted into the script):

- `_SURVEY` (read-only, for `fleetbisect check`): the groups, their members' class, driver and
  `lspci -Dnns` line, the block devices and network interfaces on the host with their sysfs
  paths, /proc/mounts, the SSH session's `SSH_CONNECTION`, `ip -o addr`, `ulimit -l`, and
  whether vfio-pci is loaded or loadable. `Survey` parses it; `preflight_checks` decides:
  a group member that holds a mounted filesystem or carries the SSH session refuses the run.
- `_BIND`: records the members' current drivers in WORK_DIR/passthrough.json ONCE, before the
  first change (a resumed run finds the originals there, not vfio-pci), then for each member:
  `vfio-pci` > driver_override, ADDR > the current driver's unbind, ADDR > drivers_probe.
- `_RESTORE`: for each recorded device: "\\n" > driver_override (clears it), ADDR > unbind
  of the driver it is on now, ADDR > drivers_probe, or ADDR > the recorded driver's bind when
  probing chose none; the state file goes once every device is back.

The kernel answers these writes synchronously; the scripts still wait (bounded) until the
`driver` link says the change happened, and fail with the device's name when it did not.
"""

from __future__ import annotations

import ipaddress
import json
import posixpath
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ..config.target import pci_address
from ..deadline import Deadline
from ..remote.base import Remote
from .base import Check, TargetStartFailed

SYSFS = "/sys"
MOUNTS = "/proc/mounts"
STATE_FILE = "passthrough.json"
WAIT_TRIES = 100  # x 0.1 s: how long a script waits for the driver link to change
_DRIVER_NAME = re.compile(r"[A-Za-z0-9_.-]*")

# --- what QEMU and libvirt are given -----------------------------------------------------


def vfio_args(addresses: list[str]) -> list[str]:
    """`-device vfio-pci,host=ADDR` for each device the inventory names (not the rest of the
    group: those are only taken from the host so that the group is whole)."""
    argv: list[str] = []
    for a in addresses:
        argv += ["-device", f"vfio-pci,host={pci_address(a)}"]
    return argv


def hostdev_xml(address: str) -> ET.Element:
    """libvirt's `<hostdev>` for one device; managed='no' because fleetbisect binds and
    restores the group itself (libvirt would bind only the device, not its group)."""
    dom, bus, rest = pci_address(address).split(":")
    slot, fn = rest.split(".")
    hostdev = ET.Element("hostdev", {"mode": "subsystem", "type": "pci", "managed": "no"})
    ET.SubElement(hostdev, "driver", {"name": "vfio"})
    source = ET.SubElement(hostdev, "source")
    ET.SubElement(source, "address", {"domain": f"0x{dom}", "bus": f"0x{bus}", "slot": f"0x{slot}",
                                      "function": f"0x{fn}"})
    return hostdev


# --- preflight ----------------------------------------------------------------------------

_SURVEY = r"""
sys=$1; mounts=$2; shift 2
for a in "$@"; do
  d=$sys/bus/pci/devices/$a
  if [ ! -e "$d" ]; then printf 'missing\t%s\n' "$a"; continue; fi
  g=$(readlink "$d/iommu_group" 2>/dev/null) || { printf 'nogroup\t%s\n' "$a"; continue; }
  g=${g##*/}
  for m in "$sys/kernel/iommu_groups/$g/devices/"*; do
    [ -e "$m" ] || continue
    b=${m##*/}
    drv=$(readlink "$m/driver" 2>/dev/null); drv=${drv##*/}
    printf 'member\t%s\t%s\t%s\t%s\t%s\t%s\t%s:%s\n' "$a" "$g" "$b" "$(cat "$m/class" 2>/dev/null)" \
      "$drv" "$(readlink -f "$m")" "$(cat "$m/vendor" 2>/dev/null)" "$(cat "$m/device" 2>/dev/null)"
    l=""; command -v lspci >/dev/null 2>&1 && l=$(lspci -Dnns "$b" 2>/dev/null | head -n 1)
    printf 'lspci\t%s\t%s\n' "$b" "$l"
  done
done
for b in "$sys/class/block/"*; do
  [ -e "$b" ] || continue
  n=${b##*/}
  printf 'block\t%s\t%s\t%s\n' "$n" "$(readlink -f "$b")" "$(cat "$b/dm/name" 2>/dev/null)"
  for h in "$b/holders/"*; do [ -e "$h" ] && printf 'holder\t%s\t%s\n' "$n" "${h##*/}"; done
done
for n in "$sys/class/net/"*; do
  [ -e "$n" ] || continue
  i=${n##*/}; p=""
  [ -e "$n/device" ] && p=$(readlink -f "$n/device")
  printf 'net\t%s\t%s\n' "$i" "$p"
  for l in "$n/"lower_*; do [ -e "$l" ] && printf 'lower\t%s\t%s\n' "$i" "${l##*/lower_}"; done
done
while read -r src mp rest; do
  r=$src; case $src in /dev/*) r=$(readlink -f "$src" 2>/dev/null || echo "$src");; esac
  printf 'mount\t%s\t%s\t%s\n' "$src" "$mp" "$r"
done < "$mounts"
printf 'ssh\t%s\n' "${SSH_CONNECTION:-}"
ip -o addr show 2>/dev/null | while IFS= read -r l; do printf 'ip\t%s\n' "$l"; done
printf 'memlock\t%s\n' "$(ulimit -l)"
if [ -d "$sys/bus/pci/drivers/vfio-pci" ]; then v=loaded
elif modprobe -n vfio-pci >/dev/null 2>&1; then v=loadable
else v=no; fi
printf 'vfio\t%s\n' "$v"
"""


@dataclass(frozen=True)
class Member:
    """One device of an IOMMU group, as sysfs shows it."""

    address: str
    group: str
    pci_class: str  # "0x020000"
    driver: str  # "" when unbound
    path: str  # its real sysfs path: what lies under it is its
    ids: str  # "0x8086:0x15b8"
    lspci: str = ""

    @property
    def bridge(self) -> bool:
        return self.pci_class.lower().removeprefix("0x")[:4] == "0604"

    def line(self) -> str:
        """The `lspci -Dnns` line, or the same facts from sysfs when lspci is missing."""
        if self.lspci:
            return self.lspci
        ids = self.ids.replace("0x", "")
        return f"{self.address} [{self.pci_class.removeprefix('0x')[:4]}]: [{ids}] (no lspci on the host)"


@dataclass
class Survey:
    """What `_SURVEY` printed, parsed; pure data, for pure decisions."""

    missing: list[str] = field(default_factory=list)
    no_group: list[str] = field(default_factory=list)
    groups: dict[str, list[Member]] = field(default_factory=dict)  # requested address -> members
    blocks: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (sysfs path, dm name)
    holders: dict[str, list[str]] = field(default_factory=dict)
    nets: dict[str, str] = field(default_factory=dict)  # interface -> its device's sysfs path
    lowers: dict[str, list[str]] = field(default_factory=dict)
    mounts: list[tuple[str, str, str]] = field(default_factory=list)  # source, mount point, resolved
    ssh_connection: str = ""
    ip_lines: list[str] = field(default_factory=list)
    memlock: str = ""
    vfio: str = ""

    @classmethod
    def parse(cls, text: str) -> "Survey":
        s = cls()
        lspci: dict[str, str] = {}
        for line in text.splitlines():
            kind, _, rest = line.partition("\t")
            f = rest.split("\t")
            if kind == "missing":
                s.missing.append(f[0])
            elif kind == "nogroup":
                s.no_group.append(f[0])
            elif kind == "member" and len(f) == 7:
                s.groups.setdefault(f[0], []).append(Member(f[2], f[1], f[3], f[4], f[5], f[6]))
            elif kind == "lspci" and len(f) == 2:
                lspci[f[0]] = f[1].strip()
            elif kind == "block" and len(f) == 3:
                s.blocks[f[0]] = (f[1], f[2])
            elif kind == "holder" and len(f) == 2:
                s.holders.setdefault(f[0], []).append(f[1])
            elif kind == "net" and len(f) == 2:
                s.nets[f[0]] = f[1]
            elif kind == "lower" and len(f) == 2:
                s.lowers.setdefault(f[0], []).append(f[1])
            elif kind == "mount" and len(f) == 3:
                s.mounts.append((f[0], f[1], f[2]))
            elif kind == "ssh":
                s.ssh_connection = rest.strip()
            elif kind == "ip":
                s.ip_lines.append(rest)
            elif kind == "memlock":
                s.memlock = rest.strip()
            elif kind == "vfio":
                s.vfio = rest.strip()
        for req, members in s.groups.items():
            s.groups[req] = [Member(m.address, m.group, m.pci_class, m.driver, m.path, m.ids,
                                    lspci.get(m.address, "")) for m in members]
        return s

    # --- what lies under a device ---

    def mounted_under(self, member: Member) -> list[str]:
        """'/dev/X on /mnt' for every mounted block device on this PCI device: its disks, their
        partitions, and what is stacked on them (dm, md: their holders)."""
        names = {n for n, (path, _) in self.blocks.items() if _under(path, member.path)}
        todo = list(names)
        while todo:
            for h in self.holders.get(todo.pop(), []):
                if h not in names:
                    names.add(h)
                    todo.append(h)
        devs = {f"/dev/{n}" for n in names}
        devs |= {f"/dev/mapper/{self.blocks[n][1]}" for n in names if n in self.blocks and self.blocks[n][1]}
        return [f"{src} on {mp}" for src, mp, resolved in self.mounts if src in devs or resolved in devs]

    def ssh_interfaces(self) -> list[str]:
        """The interfaces holding the address the SSH session arrived on (SSH_CONNECTION's
        third word)."""
        words = self.ssh_connection.split()
        if len(words) < 3:
            return []
        server = _ip(words[2])
        found = []
        for line in self.ip_lines:
            w = line.split()
            # "2: eth0    inet 10.0.0.5/24 brd ... scope global eth0\       valid_lft ..."
            if len(w) >= 4 and w[2] in ("inet", "inet6"):
                ifname = w[1].split("@")[0]
                if server is not None and _ip(w[3].split("/")[0]) == server and ifname not in found:
                    found.append(ifname)
        return found

    def device_paths(self, ifname: str, seen: set[str] | None = None) -> list[str]:
        """The sysfs paths of the devices carrying an interface: its own, or (a bridge, bond
        or VLAN) those of its lower interfaces."""
        seen = set() if seen is None else seen
        if ifname in seen:
            return []
        seen.add(ifname)
        paths = [self.nets[ifname]] if self.nets.get(ifname) else []
        for lower in self.lowers.get(ifname, []):
            paths += self.device_paths(lower, seen)
        return paths


def _under(path: str, root: str) -> bool:
    return bool(path) and bool(root) and (path == root or path.startswith(root.rstrip("/") + "/"))


def _ip(text: str):
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


def critical_reasons(survey: Survey, member: Member) -> list[str]:
    """Why taking this device from the host would cut the host off; empty when nothing."""
    reasons = [f"holds {m}" for m in survey.mounted_under(member)]
    for ifname in survey.ssh_interfaces():
        if any(_under(p, member.path) for p in survey.device_paths(ifname)):
            reasons.append(f"carries this SSH session ({ifname}, {survey.ssh_connection.split()[2]})")
    return reasons


def group_members(survey: Survey) -> list[Member]:
    """Every device the run takes from the host: the groups' members, bridges excepted, once."""
    out: dict[str, Member] = {}
    for members in survey.groups.values():
        for m in members:
            if not m.bridge:
                out.setdefault(m.address, m)
    return list(out.values())


def preflight_checks(survey: Survey, requested: list[str], memory_mib: int | None) -> list[Check]:
    checks: list[Check] = []
    for addr in requested:
        name = f"pci {addr}"
        if addr in survey.missing:
            checks.append(Check(name, False, "no such PCI device on the host (`lspci -D` lists them)"))
            continue
        if addr in survey.no_group or addr not in survey.groups:
            checks.append(Check(name, False, "has no IOMMU group: the IOMMU is off (boot the host "
                                             "with intel_iommu=on or amd_iommu=on) or unsupported"))
            continue
        members = survey.groups[addr]
        group = members[0].group
        lines = [f"IOMMU group {group}:"] + [f"  {m.line()}" for m in members]
        others = [m for m in members if m.address != addr and not m.bridge]
        bridges = [m.address for m in members if m.bridge]
        if others:
            lines.append("  shared with (taken from the host too, given back after the run): "
                         + ", ".join(f"{m.address} ({m.driver or 'no driver'})" for m in others))
        if bridges:
            lines.append(f"  bridges left alone: {', '.join(bridges)}")
        refusals = [f"{m.address} {r}" for m in members if not m.bridge for r in critical_reasons(survey, m)]
        if refusals:
            lines.append("  REFUSED: the host needs " + "; ".join(refusals))
        checks.append(Check(name, not refusals, "\n".join(lines)))
    if not survey.ssh_connection:
        checks.append(Check("pci ssh interface", True, "no SSH_CONNECTION in the session: the "
                                                        "interface SSH uses was not checked"))
    if memory_mib is not None:
        checks.append(memlock_check(survey.memlock, memory_mib))
    checks.append(Check("vfio-pci", survey.vfio in ("loaded", "loadable"), {
        "loaded": "the vfio-pci driver is loaded",
        "loadable": "vfio-pci is not loaded; `modprobe vfio-pci` can load it (the run does)",
    }.get(survey.vfio, "vfio-pci is neither loaded nor loadable (`modprobe -n vfio-pci` fails): "
                       "install the kernel's vfio modules")))
    return checks


def memlock_check(ulimit_l: str, memory_mib: int) -> Check:
    """vfio pins all guest memory: `ulimit -l` (KiB) must be unlimited or hold it."""
    need = memory_mib * 1024
    if ulimit_l == "unlimited":
        return Check("memlock", True, "ulimit -l: unlimited")
    if ulimit_l.isdigit() and int(ulimit_l) >= need:
        return Check("memlock", True, f"ulimit -l: {ulimit_l} KiB >= {need} KiB of guest memory")
    return Check("memlock", False, f"ulimit -l is {ulimit_l or 'unknown'} KiB but vfio pins all "
                                   f"{need} KiB of guest memory: raise memlock for the SSH user "
                                   "(/etc/security/limits.conf `memlock unlimited`)")


# --- bind and restore ---------------------------------------------------------------------

# wait_for DEV DRIVER ("" = unbound) TRIES
_WAIT = r"""
wait_for() {
  w_i=0
  while :; do
    w_now=$(readlink "$1/driver" 2>/dev/null); w_now=${w_now##*/}
    [ "$w_now" = "$2" ] && return 0
    [ "$w_i" -ge "$3" ] && return 1
    w_i=$((w_i+1)); sleep 0.1
  done
}
fail() { printf 'passthrough: %s\n' "$*" >&2; exit 1; }
"""

_BIND = _WAIT + r"""
sys=$1; state=$2; tries=$3; shift 3
devs=""
for a in "$@"; do
  case $a in *[!0-9a-f:.]*|"") fail "bad PCI address $a";; esac
  g=$(readlink "$sys/bus/pci/devices/$a/iommu_group") || fail "$a has no IOMMU group (is the IOMMU on?)"
  for m in "$sys/kernel/iommu_groups/${g##*/}/devices/"*; do
    b=${m##*/}
    case $(cat "$m/class") in 0x0604*) continue;; esac
    case " $devs " in *" $b "*) continue;; esac
    devs="$devs $b"
  done
done
if [ ! -e "$state" ]; then
  mkdir -p "${state%/*}" || fail "cannot create ${state%/*}"
  sep=""
  {
    printf '{"version": 1, "devices": ['
    for b in $devs; do
      drv=$(readlink "$sys/bus/pci/devices/$b/driver" 2>/dev/null); drv=${drv##*/}
      case $drv in *[!A-Za-z0-9_.-]*) fail "$b: unexpected driver name $drv";; esac
      printf '%s{"address": "%s", "driver": "%s"}' "$sep" "$b" "$drv"; sep=", "
    done
    printf ']}\n'
  } > "$state.tmp" && mv "$state.tmp" "$state" || fail "cannot write $state"
fi
if [ ! -d "$sys/bus/pci/drivers/vfio-pci" ]; then
  modprobe vfio-pci || fail "cannot load vfio-pci"
fi
for b in $devs; do
  d=$sys/bus/pci/devices/$b
  drv=$(readlink "$d/driver" 2>/dev/null); drv=${drv##*/}
  if [ "$drv" = vfio-pci ]; then printf '%s: on vfio-pci\n' "$b"; continue; fi
  printf 'vfio-pci\n' > "$d/driver_override" || fail "$b: cannot write driver_override"
  if [ -n "$drv" ]; then
    printf '%s\n' "$b" > "$sys/bus/pci/drivers/$drv/unbind" || fail "$b: cannot unbind it from $drv"
    wait_for "$d" "" "$tries" || fail "$b: still on $drv after unbind"
  fi
  printf '%s\n' "$b" > "$sys/bus/pci/drivers_probe" || fail "$b: cannot write drivers_probe"
  wait_for "$d" vfio-pci "$tries" || fail "$b: not bound to vfio-pci after drivers_probe"
  printf '%s: %s -> vfio-pci\n' "$b" "${drv:-no driver}"
done
"""

_RESTORE = _WAIT + r"""
sys=$1; state=$2; tries=$3; shift 3
rc=0
while [ "$#" -ge 2 ]; do
  b=$1; want=$2; shift 2
  d=$sys/bus/pci/devices/$b
  if [ ! -e "$d" ]; then printf 'passthrough: %s is gone\n' "$b" >&2; rc=1; continue; fi
  printf '\n' > "$d/driver_override" || { printf 'passthrough: %s: cannot clear driver_override\n' "$b" >&2; rc=1; }
  cur=$(readlink "$d/driver" 2>/dev/null); cur=${cur##*/}
  if [ "$cur" = "$want" ]; then printf '%s: on %s\n' "$b" "${want:-no driver}"; continue; fi
  if [ -n "$cur" ]; then
    printf '%s\n' "$b" > "$sys/bus/pci/drivers/$cur/unbind"
    if ! wait_for "$d" "" "$tries"; then printf 'passthrough: %s: still on %s\n' "$b" "$cur" >&2; rc=1; continue; fi
  fi
  if [ -n "$want" ]; then
    printf '%s\n' "$b" > "$sys/bus/pci/drivers_probe"
    if ! wait_for "$d" "$want" "$tries"; then
      now=$(readlink "$d/driver" 2>/dev/null)
      [ -z "$now" ] && printf '%s\n' "$b" > "$sys/bus/pci/drivers/$want/bind"
      if ! wait_for "$d" "$want" "$tries"; then
        printf 'passthrough: %s: not back on %s\n' "$b" "$want" >&2; rc=1; continue
      fi
    fi
  fi
  printf '%s: %s -> %s\n' "$b" "${cur:-no driver}" "${want:-no driver}"
done
[ "$rc" -eq 0 ] && rm -f "$state"
exit "$rc"
"""

_READ_STATE = '[ -e "$1" ] || exit 3; cat "$1"'


class Passthrough:
    """The PCI devices of one target: preflight, bind for the run, restore after it.

    `sysfs` and `mounts` are where the host's sysfs and mount table are (tests point them at a
    fake tree); the state file lives in the host's work directory."""

    def __init__(self, addresses: list[str], work_dir: str, *, sysfs: str = SYSFS,
                 mounts: str = MOUNTS, tries: int = WAIT_TRIES):
        self.addresses = [pci_address(a) for a in addresses]
        self.state = posixpath.join(work_dir, STATE_FILE)
        self.sysfs = sysfs
        self.mounts = mounts
        self.tries = tries

    def survey(self, host: Remote, deadline: Deadline) -> Survey:
        res = host.run(["sh", "-c", _SURVEY, "sh", self.sysfs, self.mounts, *self.addresses],
                       deadline=deadline, check=True)
        return Survey.parse(res.stdout)

    def probes(self, host: Remote, deadline: Deadline, memory_mib: int | None) -> list[Check]:
        if not self.addresses:
            return []
        return preflight_checks(self.survey(host, deadline), self.addresses, memory_mib)

    def bind(self, host: Remote, deadline: Deadline) -> str:
        """Give the groups to vfio-pci (idempotent: a device already there is left alone), unless
        a device of theirs holds a mounted filesystem or the SSH session (TargetStartFailed)."""
        if not self.addresses:
            return ""
        survey = self.survey(host, deadline)  # `check` is not a precondition of `run`
        refusals = [f"{m.address} {r}" for m in group_members(survey) for r in critical_reasons(survey, m)]
        if refusals:
            raise TargetStartFailed("PCI passthrough refused, the host needs " + "; ".join(refusals))
        res = host.run(["sh", "-c", _BIND, "sh", self.sysfs, self.state, str(self.tries), *self.addresses],
                       deadline=deadline, check=True)
        return res.stdout.strip()

    def recorded(self, host: Remote, deadline: Deadline) -> list[tuple[str, str]] | None:
        """(address, original driver) from the host's state file; None when there is none."""
        res = host.run(["sh", "-c", _READ_STATE, "sh", self.state], deadline=deadline)
        if res.exit_status == 3:
            return None
        if not res.ok:
            raise ValueError(f"cannot read {self.state}: {res.stderr.strip()}")
        return parse_state(res.stdout, self.state)

    def restore(self, host: Remote, deadline: Deadline) -> str:
        """Give every recorded device back to its original driver (any run's record: a crashed
        one's too); nothing to do without a state file."""
        pairs = self.recorded(host, deadline)
        if pairs is None:
            return ""
        words = [w for pair in pairs for w in pair]
        res = host.run(["sh", "-c", _RESTORE, "sh", self.sysfs, self.state, str(self.tries), *words],
                       deadline=deadline, check=True)
        return res.stdout.strip()


def parse_state(text: str, where: str) -> list[tuple[str, str]]:
    """The state file's devices, every word checked before it reaches a script."""
    try:
        data = json.loads(text)
        pairs = [(pci_address(d["address"]), d["driver"]) for d in data["devices"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where} is not a passthrough record ({e}); the devices it named are "
                         "not restored: check them with `lspci -k`") from None
    for addr, drv in pairs:
        if not isinstance(drv, str) or not _DRIVER_NAME.fullmatch(drv):
            raise ValueError(f"{where}: {addr} has a driver name {drv!r} that is not one")
    return pairs
