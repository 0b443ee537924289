"""`kind: qemu`: a VM started by the host over SSH, direct kernel boot, or booting the build's
disk image (converted onto WORK_DIR/disk.raw, or image.dest, by stages/image.py) with its own
bootloader when there is no kernel artifact.

`qemu_argv` is a pure function (tested without any host); `start_vm`/`stop_vm` are the only
places that touch the VM, and they touch only the VM this tool started: its PID comes from our
own pidfile and is checked against /proc/PID/cmdline before any signal is sent.
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

from ..config.target import TargetConfig
from ..deadline import Deadline
from ..files import write_text_masked
from ..remote.agent import AgentRemote, StreamTransport, relay_opener
from ..remote.base import Remote, RemoteCommandFailed
from ..stages.image import deploy_image, probes as image_probes
from . import virtiofs
from .base import SH_RUNNING, Check, Target, TargetStartFailed
from .passthrough import Passthrough, vfio_args


@dataclass(frozen=True)
class VMPaths:
    """Where the VM's files live on the host."""

    dir: str

    @classmethod
    def under(cls, work_dir: str) -> "VMPaths":
        return cls(posixpath.join(work_dir, "vm"))

    @property
    def pidfile(self) -> str:
        return posixpath.join(self.dir, "qemu.pid")

    @property
    def console(self) -> str:
        return posixpath.join(self.dir, "console.log")

    @property
    def agent_socket(self) -> str:
        """The guest agent's unix socket (QEMU listens on it; the agent relay connects)."""
        return posixpath.join(self.dir, "qga.sock")


# A unix socket's path must fit sockaddr_un.sun_path (108 bytes with its NUL on Linux).
UNIX_PATH_MAX = 107


def qemu_opt(value: str) -> str:
    """A value inside a QEMU `-chardev`/`-device` option list: a comma is written twice."""
    return value.replace(",", ",,")


def agent_args(paths: VMPaths) -> list[str]:
    """The guest agent's channel: a virtio-serial port named as qemu-ga expects, backed by a
    unix socket on the host that QEMU listens on (wait=off: boot does not wait for a client)."""
    return [
        "-chardev", f"socket,path={qemu_opt(paths.agent_socket)},server=on,wait=off,id=qga0",
        "-device", "virtio-serial-pci",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ]


def accel_args(accel: str) -> list[str]:
    if accel == "tcg":
        return ["-accel", "tcg"]
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    # auto: KVM where it initialises, TCG otherwise. A paravirtual /dev/kvm that opens but
    # cannot run a guest is not detected here; such hosts set `accel: tcg` explicitly.
    return ["-accel", "kvm", "-accel", "tcg"]


def qemu_argv(target, boot, *, kernel: str | None, initrd: str | None, paths: VMPaths,
              disk: tuple[str, str] | None = None) -> list[str]:
    """The full QEMU command line: every word data, nothing for a shell to interpret. `disk`
    (path, format): the deployed disk image, the guest's first virtio disk (writable: it is a
    fresh copy each step). Without `kernel` the guest boots from it with its own bootloader."""
    guest = target.guest
    argv = [
        target.qemu,
        "-machine", target.machine,
        *accel_args(target.accel),
        "-m", str(boot.memory),
        "-smp", str(boot.cpus),
        "-display", "none", "-no-reboot",  # -nographic cannot be combined with -daemonize
        "-serial", f"file:{paths.console}",
        "-monitor", "none",
    ]
    if kernel:
        argv += ["-kernel", kernel]
        if initrd:
            argv += ["-initrd", initrd]
        argv += ["-append", boot.cmdline]
    if disk:
        argv += ["-drive", f"file={_drive_path(disk[0])},if=virtio,format={disk[1]}"]
    if boot.root:
        argv += ["-drive", f"file={boot.root},if=virtio,format=raw,snapshot=on"]
    netdev = "user,id=n0" + (f",hostfwd=tcp:{guest.address}:{guest.port}-:22" if guest.port else "")
    argv += [
        "-netdev", netdev,
        "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-device", "virtio-rng-pci",
        *(agent_args(paths) if guest.has_agent else []),
    ]
    argv += vfio_args(getattr(target, "pci", []))
    if getattr(target, "virtiofs", None):
        argv += virtiofs.qemu_args(target.virtiofs, virtiofs.socket_path(paths.dir), boot.memory)
    argv += [*boot.qemu_args, "-daemonize", "-pidfile", paths.pidfile]
    return argv


def _drive_path(path: str) -> str:
    """A path inside QEMU's -drive option list: commas are doubled, as QEMU reads them."""
    return path.replace(",", ",,")


# Stop the VM named by our pidfile, only if that PID is still a QEMU using that very pidfile.
_STOP = SH_RUNNING + r"""
pidfile=$1; wait_s=$2
[ -f "$pidfile" ] || exit 0
pid=$(cat "$pidfile" 2>/dev/null) || exit 0
case "$pid" in ''|*[!0-9]*) rm -f "$pidfile"; exit 0;; esac
if ! tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pidfile"; then
  rm -f "$pidfile"; exit 0
fi
kill -TERM "$pid" 2>/dev/null
i=0
while running "$pid" && [ "$i" -lt "$wait_s" ]; do sleep 0.02; i=$((i+1)); done
running "$pid" && kill -KILL "$pid" 2>/dev/null
rm -f "$pidfile"
echo "stopped $pid"
"""


def stop_vm(host: Remote, paths: VMPaths, deadline: Deadline) -> str:
    """Stop the VM this tool started (if any). Returns what was done, for the log."""
    res = host.run(
        ["sh", "-c", _STOP, "sh", paths.pidfile, "250"], deadline=deadline.sub(30), check=True
    )
    return res.stdout.strip()


def start_vm(host: Remote, argv: list[str], paths: VMPaths, deadline: Deadline):
    """Start QEMU daemonized; returns the Result (non-zero exit: QEMU refused to start)."""
    script = 'mkdir -p "$1" && rm -f "$2" && shift 2 && exec "$@"'
    return host.run(
        ["sh", "-c", script, "sh", paths.dir, paths.console, *argv], deadline=deadline.sub(60)
    )


def vm_alive(host: Remote, paths: VMPaths, deadline: Deadline) -> bool:
    check = SH_RUNNING + 'p=$(cat "$1" 2>/dev/null) && running "$p"'
    return host.run(["sh", "-c", check, "sh", paths.pidfile], deadline=deadline.sub(15)).ok


def describe(argv: list[str]) -> str:
    return shlex.join(argv)


class QemuConfig(TargetConfig):
    """`target: {kind: qemu, ...}` in the inventory."""

    kind: Literal["qemu"]
    qemu: str = "qemu-system-x86_64"
    machine: str = "q35"
    accel: Literal["auto", "kvm", "tcg"] = "auto"


# Wait on the host, in one round trip, for QEMU to exit (its pidfile names it) or $2 seconds.
_WAIT_EXIT = SH_RUNNING + 'p=$(cat "$1" 2>/dev/null) || exit 0; end=$(( $(date +%s) + $2 )); ' \
             'while running "$p"; do [ "$(date +%s)" -ge "$end" ] && exit 1; sleep 0.2; done; exit 0'


AGENT_ATTEMPT = 2.0  # seconds one readiness attempt waits for the agent's answer


class Qemu(Target):
    """`kind: qemu`: a QEMU the host starts over SSH for each step, direct kernel boot, user-mode
    networking forwarding the guest's sshd to `guest.port`. Its files live in WORK_DIR/vm."""

    kind = "qemu"
    Config = QemuConfig

    def __new__(cls, host_cfg, playbook):
        # Only a VM given PCI devices changes the host (their drivers) and has a restore(): the
        # run connects to restore only a kind that overrides it, so a plain VM costs nothing.
        if cls is Qemu and getattr(host_cfg.target, "pci", None):
            cls = QemuPassthrough
        return super().__new__(cls)

    def __init__(self, host_cfg, playbook):
        super().__init__(host_cfg, playbook)
        self.paths = VMPaths.under(host_cfg.work_dir)
        self.disk: tuple[str, str] | None = None  # (path, format) of the deployed disk image
        self.passthrough = Passthrough(self.config.pci, host_cfg.work_dir)

    @property
    def reached_by(self) -> str:
        return "the guest agent" if self.config.guest.reach == "agent" else "SSH"

    def probes(self, host: Remote, deadline: Deadline) -> list[Check]:
        res = host.run(["sh", "-c", 'command -v "$1"', "sh", self.config.qemu], deadline=deadline)
        checks = [Check("qemu", True, res.stdout.strip()) if res.ok else
                  Check("qemu", False, f"{self.config.qemu} not found in PATH on the host")]
        if self.playbook.disk_image is not None:
            checks += image_probes(host, self.playbook.disk_image, self.host_cfg.work_dir, deadline)
        if self.config.guest.has_agent:
            checks.append(self._agent_probe(host, deadline))
        checks += self.passthrough.probes(host, deadline, self.playbook.boot.memory)
        if self.config.virtiofs:
            checks += virtiofs.probes(host, self.config.virtiofs, deadline)
        return checks

    def _agent_probe(self, host: Remote, deadline: Deadline) -> Check:
        sock = self.paths.agent_socket
        if len(sock.encode()) > UNIX_PATH_MAX:
            return Check("guest agent", False, f"the agent socket {sock} is longer than a unix socket "
                         f"path may be ({UNIX_PATH_MAX} bytes): use a shorter work_dir")
        res = host.run(["sh", "-c", "command -v socat || command -v python3"], deadline=deadline)
        if not res.ok:
            return Check("guest agent", False, "the host has neither socat nor python3 to relay to the "
                         "guest agent's socket")
        return Check("guest agent", True, f"relay {res.stdout.split()[0]} to {sock}")

    def stop(self, host: Remote, deadline: Deadline) -> str:
        done = stop_vm(host, self.paths, deadline)
        if self.config.virtiofs:
            done = " ".join(filter(None, [done, virtiofs.stop_virtiofsd(host, self.paths.dir, deadline)]))
        return done

    def deploy(self, host: Remote, artifacts: Mapping[str, str], step_dir: Path, deadline: Deadline) -> None:
        spec = self.playbook.disk_image
        if spec is not None:
            self.disk = (deploy_image(host, artifacts["image"], spec, self.host_cfg.work_dir, deadline),
                         spec.format)

    def start(self, host: Remote, artifacts: Mapping[str, str], step_dir: Path, deadline: Deadline) -> None:
        if self.playbook.disk_image is not None and self.disk is None:
            raise TargetStartFailed("the disk image was not deployed before the start")
        argv = qemu_argv(self.config, self.playbook.boot, kernel=artifacts.get("kernel"),
                         initrd=artifacts.get("initrd"), paths=self.paths, disk=self.disk)
        commands = []
        if self.config.pci:  # the groups go to vfio-pci (once a run; the record is kept on the host)
            try:
                self.passthrough.bind(host, deadline.sub(60))
            except RemoteCommandFailed as e:
                raise TargetStartFailed(f"PCI passthrough: {e.result.stderr.strip()[-300:]}") from None
        if self.config.virtiofs:
            commands.append(describe(virtiofs.start_virtiofsd(host, self.config.virtiofs, self.paths.dir,
                                                              deadline.sub(30))))
        write_text_masked(step_dir / "commands.txt", "".join(c + "\n" for c in [*commands, describe(argv)]))
        started = start_vm(host, argv, self.paths, deadline)
        if not started.ok:
            raise TargetStartFailed(
                f"QEMU did not start (exit {started.exit_status}): {started.stderr.strip()[-300:]}")

    def alive(self, host: Remote, deadline: Deadline) -> bool:
        return vm_alive(host, self.paths, deadline)

    def probe(self, host: Remote) -> bool:
        if self.config.guest.reach == "agent":
            return True  # the login attempt is the probe: a guest-sync qemu-ga answers
        return super().probe(host)

    def login(self, host: Remote, deadline: Deadline) -> Remote:
        """SSH by default; with `reach: agent` the guest agent, through a relay on the host
        to QEMU's socket. One attempt is short, so that waiting for the guest still notices
        a QEMU that exited."""
        if self.config.guest.reach != "agent":
            return super().login(host, deadline)
        transport = StreamTransport(f"{self.host_cfg.name}/guest",
                                    relay_opener(host, self.paths.agent_socket))
        return AgentRemote.connect(transport, deadline=deadline.sub(AGENT_ATTEMPT))

    def wait_off(self, host: Remote, seconds: float) -> bool:
        res = host.run(["sh", "-c", _WAIT_EXIT, "sh", self.paths.pidfile, str(int(seconds) + 1)],
                       deadline=Deadline.after(seconds + 30))
        return res.ok

    def fetch_console(self, host: Remote, local: Path, deadline: Deadline) -> None:
        host.get(self.paths.console, local, deadline=deadline)


class QemuPassthrough(Qemu):
    """`kind: qemu` with `pci:` devices: the run ends by giving them back to their drivers."""

    def restore(self, host: Remote, deadline: Deadline) -> str:
        """PCI devices back to the drivers they had (from the host's record: this run's, or a
        crashed one's); nothing when none was recorded."""
        return self.passthrough.restore(host, deadline)
