"""virtiofs: a host directory the guest mounts (`mount -t virtiofs TAG /mnt`, or as its root with
`root=TAG rootfstype=virtiofs`), so files move in and out without repacking an image.

UNTESTED ON A LIVE GUEST: Debian 12 ships no virtiofsd this lab can run (QEMU 7.2 dropped the C
daemon; the Rust one is not packaged). What is here is generated and checked against golden
files: QEMU's arguments, the virtiofsd command line, libvirt's <filesystem> and <memoryBacking>,
and the host script that starts virtiofsd (tested with a stand-in that serves the socket).

vhost-user needs the guest's RAM shared with the daemon, hence the memfd memory backend with
share=on as the guest's NUMA node (QEMU) or <memoryBacking> memfd/shared (libvirt).
"""

from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET

from ..config.target import Virtiofs
from ..deadline import Deadline
from ..remote.base import Remote
from .base import SH_RUNNING, Check, TargetStartFailed


def socket_path(vm_dir: str) -> str:
    return posixpath.join(vm_dir, "virtiofs.sock")


def pidfile(vm_dir: str) -> str:
    return posixpath.join(vm_dir, "virtiofsd.pid")


def qemu_args(cfg: Virtiofs, socket: str, memory_mib: int) -> list[str]:
    """The vhost-user-fs device on virtiofsd's socket, and guest RAM it can map."""
    return [
        "-chardev", f"socket,id=vfs0,path={socket.replace(',', ',,')}",  # QEMU's escape for ,
        "-device", f"vhost-user-fs-pci,chardev=vfs0,tag={cfg.tag}",
        "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
        "-numa", "node,memdev=mem",
    ]


def virtiofsd_argv(cfg: Virtiofs, socket: str) -> list[str]:
    """The Rust virtiofsd (gitlab.com/virtio-fs/virtiofsd) serving one QEMU on `socket`."""
    return [cfg.virtiofsd, "--socket-path", socket, "--shared-dir", cfg.source, "--cache", cfg.cache]


def filesystem_xml(cfg: Virtiofs) -> ET.Element:
    """libvirt's <filesystem> (libvirt starts virtiofsd itself, from <binary path>)."""
    fs = ET.Element("filesystem", {"type": "mount", "accessmode": "passthrough"})
    ET.SubElement(fs, "driver", {"type": "virtiofs"})
    binary = ET.SubElement(fs, "binary", {"path": cfg.virtiofsd})
    if cfg.cache != "auto":  # libvirt spells never "none"
        ET.SubElement(binary, "cache", {"mode": {"never": "none"}.get(cfg.cache, cfg.cache)})
    ET.SubElement(fs, "source", {"dir": cfg.source})
    ET.SubElement(fs, "target", {"dir": cfg.tag})
    return fs


def memory_backing_xml() -> ET.Element:
    """The <memoryBacking> a domain with a virtiofs <filesystem> needs (shared memfd RAM)."""
    mb = ET.Element("memoryBacking")
    ET.SubElement(mb, "source", {"type": "memfd"})
    ET.SubElement(mb, "access", {"mode": "shared"})
    return mb


# Start virtiofsd in the background, its PID in our pidfile, and wait (bounded) for its socket.
_START = SH_RUNNING + r"""
pidfile=$1; sock=$2; log=$3; tries=$4; shift 4
mkdir -p "${pidfile%/*}" && rm -f "$sock" || exit 1
setsid "$@" </dev/null >"$log" 2>&1 &
echo $! > "$pidfile"
i=0
while [ ! -S "$sock" ]; do
  running "$(cat "$pidfile")" || { echo "virtiofsd exited:" >&2; tail -n 5 "$log" >&2; exit 1; }
  [ "$i" -ge "$tries" ] && { echo "virtiofsd made no socket at $sock" >&2; exit 1; }
  i=$((i+1)); sleep 0.1
done
"""

# Stop the virtiofsd our pidfile names, only if that PID still serves our socket.
_STOP = SH_RUNNING + r"""
pidfile=$1; sock=$2
[ -f "$pidfile" ] || exit 0
pid=$(cat "$pidfile" 2>/dev/null)
case "$pid" in ''|*[!0-9]*) rm -f "$pidfile"; exit 0;; esac
if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$sock"; then
  kill -TERM "$pid" 2>/dev/null
  i=0
  while running "$pid" && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  running "$pid" && kill -KILL "$pid" 2>/dev/null
  echo "stopped virtiofsd $pid"
fi
rm -f "$pidfile" "$sock"
"""


def start_virtiofsd(host: Remote, cfg: Virtiofs, vm_dir: str, deadline: Deadline, tries: int = 100) -> list[str]:
    """Start virtiofsd for the next QEMU; returns its argv (for commands.txt)."""
    sock = socket_path(vm_dir)
    argv = virtiofsd_argv(cfg, sock)
    res = host.run(["sh", "-c", _START, "sh", pidfile(vm_dir), sock, posixpath.join(vm_dir, "virtiofsd.log"),
                    str(tries), *argv], deadline=deadline)
    if not res.ok:
        raise TargetStartFailed(f"virtiofsd did not start: {res.stderr.strip()[-300:]}")
    return argv


def stop_virtiofsd(host: Remote, vm_dir: str, deadline: Deadline) -> str:
    res = host.run(["sh", "-c", _STOP, "sh", pidfile(vm_dir), socket_path(vm_dir)], deadline=deadline, check=True)
    return res.stdout.strip()


def probes(host: Remote, cfg: Virtiofs, deadline: Deadline) -> list[Check]:
    """virtiofsd is there and the exported directory exists (read-only)."""
    res = host.run(["sh", "-c", '[ -x "$1" ] || exit 3; [ -d "$2" ] || exit 4', "sh", cfg.virtiofsd, cfg.source],
                   deadline=deadline)
    why = {3: f"{cfg.virtiofsd} is not an executable on the host (Debian 12 ships none: build the "
              "Rust virtiofsd, or set virtiofs.virtiofsd)",
           4: f"{cfg.source} is not a directory on the host"}
    if res.ok:
        return [Check("virtiofs", True, f"{cfg.virtiofsd} exports {cfg.source} as {cfg.tag!r}")]
    return [Check("virtiofs", False, why.get(res.exit_status, res.stderr.strip() or f"exit {res.exit_status}"))]
