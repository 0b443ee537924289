"""The lab's libvirt: `virtlogd` and `libvirtd` started here as root, without systemd, and lab
domains defined in it.

    with LabLibvirt.start(Path("/tmp/lab/libvirt")) as lv:       # ~12 s the first time
        with LabDomain.define(lv, lab_domain_xml("fb-lab-1a2b", ...)) as dom:
            ...  # `virsh -c qemu:///system` (over the lab host's SSH) sees fb-lab-1a2b

libvirtd of the system URI is one per machine (its socket is /run/libvirt/libvirt-sock). When
one already answers there, it is used and left alone; the daemons started here are tracked by
PID and stopped by PID (SIGTERM, then SIGKILL) by stop() or a finalizer. A LabDomain is
destroyed and undefined by name when it is closed: it is this lab's own, named fb-lab-<random>.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path

from ..targets import domainxml as dx

URI = "qemu:///system"
SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
# What libvirtd and its QEMU driver expect to exist (systemd's tmpfiles would make them).
DIRS = ("/run/libvirt", "/var/lib/libvirt/qemu", "/var/lib/libvirt/boot", "/var/log/libvirt/qemu",
        "/var/cache/libvirt/qemu")
START_TIMEOUT = 300.0  # the first `virsh` call probes QEMU: ~12 s on 2 idle cores, much more on busy ones
STOP_TIMEOUT = 10.0


class LabLibvirtError(RuntimeError):
    """The lab's libvirt did not come up; the message carries the tail of its log."""


def answering(path: Path = SOCKET) -> bool:
    """A daemon accepts connections on the unix socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def virsh(*args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """`virsh -c qemu:///system ARGS` on this machine (for fixtures; the target goes over SSH)."""
    return subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True,
                          check=check, timeout=timeout, stdin=subprocess.DEVNULL)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:  # libvirtd first, then the virtlogd it logs through
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        else:
            proc.wait()


# The QEMU driver's settings for the lab. QEMU runs as root: the unprivileged default user
# (libvirt-qemu) cannot reach the lab's files under 0700 temporary directories, and libvirt
# re-probes QEMU (~12 s unloaded, minutes on a busy machine) at every define when /dev/kvm is
# open to root but not to that user ("KVM was enabled when probing ..., but it is not
# available now").
QEMU_CONF = 'user = "root"\ngroup = "root"\n'


def _with_qemu_conf(argv: list[str], base_dir: Path) -> list[str]:
    """Run `argv` (libvirtd) in a mount namespace of its own where /etc/libvirt/qemu.conf is the
    lab's: the host's file is never changed, and the bind mount dies with the daemon. unshare
    and sh exec, so the PID is libvirtd's."""
    conf = base_dir / "qemu.conf"
    conf.write_text(QEMU_CONF)
    script = 'mount --bind "$1" /etc/libvirt/qemu.conf && shift && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(conf), *argv]


class LabLibvirt:
    def __init__(self, base_dir: Path, procs: list[subprocess.Popen]):
        self.base_dir = base_dir
        self.uri = URI
        self.procs = procs  # [libvirtd, virtlogd] when started here, [] when reused
        self._finalizer = weakref.finalize(self, _stop, list(procs))

    @property
    def started_here(self) -> bool:
        return bool(self.procs)

    @classmethod
    def start(cls, base_dir: Path, timeout: float = START_TIMEOUT) -> "LabLibvirt":
        base_dir = Path(base_dir).resolve()
        base_dir.mkdir(parents=True, exist_ok=True)
        procs: list[subprocess.Popen] = []
        lab = cls(base_dir, procs)
        end = time.monotonic() + timeout
        try:
            if not answering(SOCKET):
                for d in DIRS:
                    Path(d).mkdir(parents=True, exist_ok=True)
                if not answering(VIRTLOGD_SOCKET):
                    procs.insert(0, cls._launch("virtlogd", base_dir))
                    cls._wait_socket(VIRTLOGD_SOCKET, procs[0], end, base_dir / "virtlogd.log")
                procs.insert(0, cls._launch("libvirtd", base_dir))
                cls._wait_socket(SOCKET, procs[0], end, base_dir / "libvirtd.log")
            lab._finalizer.detach()
            lab._finalizer = weakref.finalize(lab, _stop, list(procs))
            # The first call makes libvirtd probe QEMU: take that wait here, once.
            virsh("version", timeout=max(1.0, end - time.monotonic()))
        except (subprocess.SubprocessError, OSError, LabLibvirtError) as e:
            _stop(procs)
            raise LabLibvirtError(f"the lab's libvirt did not start: {e}; {lab.log_tail()}") from None
        return lab

    @staticmethod
    def _launch(daemon: str, base_dir: Path) -> subprocess.Popen:
        exe = shutil.which(daemon, path="/usr/sbin:/usr/bin:/sbin:/bin") or daemon
        argv = [exe, "-p", str(base_dir / f"{daemon}.pid")]
        if daemon == "libvirtd":
            argv = _with_qemu_conf(argv, base_dir)
        log = open(base_dir / f"{daemon}.log", "ab")
        try:
            return subprocess.Popen(argv,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        finally:
            log.close()

    @staticmethod
    def _wait_socket(path: Path, proc: subprocess.Popen, end: float, log: Path) -> None:
        while not answering(path):
            if proc.poll() is not None:
                raise LabLibvirtError(f"{proc.args[0]} exited {proc.returncode}")
            if time.monotonic() > end:
                raise LabLibvirtError(f"{path} did not answer")
            time.sleep(0.05)

    def log_tail(self, lines: int = 3) -> str:
        out = []
        for name in ("libvirtd.log", "virtlogd.log"):
            try:
                tail = (self.base_dir / name).read_text(errors="replace").strip().splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"{name}: " + " | ".join(tail))
        return "; ".join(out)

    def stop(self) -> None:
        """Stop the daemons started here (by PID); a reused libvirtd is left running."""
        self._finalizer()

    def __enter__(self) -> "LabLibvirt":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def unique_name(prefix: str = "fb-lab") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _remove_domain(name: str) -> None:
    """Destroy and undefine the lab domain `name` (if it exists): by name through libvirt."""
    if not answering(SOCKET):
        return
    virsh("destroy", name, check=False, timeout=60)
    virsh("undefine", name, check=False, timeout=60)


class LabDomain:
    """A domain defined in the lab's libvirt, removed (destroy, undefine) when closed."""

    def __init__(self, name: str):
        self.name = name
        self._finalizer = weakref.finalize(self, _remove_domain, name)

    @classmethod
    def define(cls, xml: str, workdir: Path) -> "LabDomain":
        name = dx.parse(xml).findtext("name")
        path = Path(workdir) / f"{name}.xml"
        path.write_text(xml)
        dom = cls(name)
        res = virsh("define", str(path), check=False)
        if res.returncode != 0:
            dom._finalizer.detach()
            raise LabLibvirtError(f"virsh define {name}: {res.stderr.strip()}")
        return dom

    def dumpxml(self) -> str:
        return virsh("dumpxml", "--inactive", self.name).stdout

    def state(self) -> str:
        return virsh("domstate", self.name).stdout.strip()

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "LabDomain":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lab_domain_xml(name: str, *, kernel: str, initrd: str, guest_port: int, memory_mb: int = 512) -> str:
    """A user's domain as the lab has one: direct kernel boot of the lab kernel, user networking
    forwarding 127.0.0.1:guest_port to the guest's sshd, a pty serial, a description and a
    reboot policy of its own (so a restore that forgets something shows)."""
    root = dx.parse(dx.builtin(name, domain_type="qemu", machine="q35", memory_mb=memory_mb, cpus=1,
                               network="user", guest_address="127.0.0.1", guest_port=guest_port))
    desc = dx.ET.Element("description")
    desc.text = "fleetbisect lab domain: must come back exactly as it was"
    root.insert(1, desc)
    root.find("on_reboot").text = "restart"
    dx.direct_kernel_boot(root, kernel, initrd, "console=ttyS0 panic=-1 quiet")
    dx.ET.indent(root)
    return dx.serialize(root)
