"""The lab guest: Debian's cloud kernel and an initramfs built here, cached.

    assets = ensure_assets()      # ~/.cache/fleetbisect/lab/<recipe>-<kernel package>_<version>/

The kernel is the real `linux-image-*-cloud-amd64` package, fetched with `apt-get download` and
unpacked with `dpkg -x` (nothing is installed). The base initramfs holds busybox, dropbear with
a host key made here (so the guest's key is known and checked, never accepted blindly), scp and
sftp-server with their libraries, and the virtio modules the cloud kernel builds as modules.
Its /init brings up eth0 (10.0.2.15, QEMU's user network), runs the hooks a per-commit overlay
adds in /etc/fleetbisect/init.d (that is where the lab repo's regressions live), starts
dropbear unless /etc/fleetbisect/no-ssh exists, and prints on the serial console

    FLEETBISECT-READY release=<the build's release> uname=<uname -r>

Building takes a few seconds; it happens once per cache directory, under a lock, in a
temporary directory renamed into place, so a half-built cache is never used. The directory is
named after the recipe and the exact kernel package and version apt offers, so a new Debian
kernel (or a new recipe) gets a new image. Asking apt costs ~0.7 s (Debian's Docker images keep
no binary package cache), so the answer is remembered until the package lists change, and a
cached call costs a few milliseconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InfraError
from ..initramfs import MOUNTS, add_binary, add_busybox
from .cpio import CpioWriter

RECIPE = "lab-v3"  # bump when the image's contents change: a new cache directory is built
META_PACKAGE = "linux-image-cloud-amd64"
# virtio is modules-only in Debian's kernels; this order satisfies their dependencies.
MODULES = (
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/net/virtio_net.ko",
    "drivers/char/hw_random/virtio-rng.ko",  # without an RNG, dropbear waits seconds for entropy
    "drivers/char/virtio_console.ko",  # virtio-serial ports: the guest agent's channel (lab/agent.py)
)
GUEST_USER = "root"


@dataclass(frozen=True)
class LabAssets:
    dir: Path
    kernel: Path  # bzImage
    kernel_release: str  # Debian's, e.g. 6.1.0-56-cloud-amd64
    base_initramfs: Path
    guest_host_key_pub: str  # "ssh-ed25519 AAAA..."
    guest_host_key_pub_file: Path
    guest_user_key: Path  # private key that logs in as GUEST_USER
    guest_user: str = GUEST_USER


def cache_root() -> Path:
    env = os.environ.get("FLEETBISECT_LAB_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleetbisect" / "lab"


def build_once(root: Path, final: Path, make) -> None:
    """Make `final` (a directory under the cache `root`) once: `make(tmp)` fills a temporary
    directory that becomes `final` only when complete, under a lock, so concurrent labs
    build it once and a killed one leaves nothing half made."""
    if (final / "complete").exists():
        return
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same thing
        if (final / "complete").exists():
            return
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            make(tmp)
            (tmp / "complete").write_text("")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_assets(cache_dir: Path | None = None) -> LabAssets:
    root = Path(cache_dir) if cache_dir else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    package, version = _kernel_package(root)
    final = root / f"{RECIPE}-{package}_{version}"
    build_once(root, final, lambda tmp: _build(tmp, package, version))
    return _load(final)


def _load(d: Path) -> LabAssets:
    pub = (d / "guest_host_key.pub").read_text().strip()
    return LabAssets(
        dir=d,
        kernel=d / "bzImage",
        kernel_release=(d / "kernel.release").read_text().strip(),
        base_initramfs=d / "base-initramfs.img",
        guest_host_key_pub=pub,
        guest_host_key_pub_file=d / "guest_host_key.pub",
        guest_user_key=d / "guest_user_key",
    )


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InfraError(f"lab image: `{' '.join(argv)}` failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return proc.stdout


def _kernel_package(root: Path) -> tuple[str, str]:
    """The versioned package the metapackage points at and its version, e.g.
    ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2"); remembered in `root` per state of apt's lists."""
    memo = root / "kernel-package.json"
    lists = _lists_fingerprint()
    try:
        known = json.loads(memo.read_text())
        if lists and known["lists"] == lists:
            return known["package"], known["version"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        proc = subprocess.run(["apt-cache", "show", "--no-all-versions", META_PACKAGE], capture_output=True, text=True)
    except FileNotFoundError:
        raise InfraError(f"the lab fetches Debian's {META_PACKAGE} with apt, and this machine has no apt-cache")
    for line in proc.stdout.splitlines():
        # Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
        if line.startswith("Depends:"):
            dep = line.split(":", 1)[1].split(",")[0].strip()
            if dep.startswith("linux-image-") and "(=" in dep:
                package, version = dep.split("(=", 1)
                package, version = package.strip(), version.rstrip(")").strip()
                tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
                tmp.write_text(json.dumps({"lists": lists, "package": package, "version": version}) + "\n")
                tmp.replace(memo)
                return package, version
    raise InfraError(
        f"the lab needs Debian's {META_PACKAGE} and apt does not know it "
        f"({(proc.stderr or proc.stdout).strip()[:200] or 'no package lists'}): run `apt-get update` "
        "(.ci/setup does) on a Debian or Ubuntu machine"
    )


def _lists_fingerprint() -> str:
    """A hash of apt's package lists (names, sizes, mtimes): it changes when `apt-get update` does."""
    try:
        proc = subprocess.run(["apt-config", "shell", "D", "Dir::State::lists/d"], capture_output=True, text=True)
        lists = Path(proc.stdout.partition("=")[2].strip().strip("'") or "/var/lib/apt/lists")
        entries = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in lists.iterdir() if "_Packages" in f.name)
    except OSError:
        return ""
    return hashlib.sha256(repr(entries).encode()).hexdigest() if entries else ""


def _build(d: Path, package: str, version: str) -> None:
    kver = package.removeprefix("linux-image-")
    dl = d / "download"
    dl.mkdir()
    dl.chmod(0o777)  # apt's _apt user writes the download when it can
    _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=dl)
    (deb,) = dl.glob("*.deb")
    unpacked = d / "unpacked"
    _run(["dpkg", "-x", str(deb), str(unpacked)])
    shutil.copy(unpacked / "boot" / f"vmlinuz-{kver}", d / "bzImage")
    (d / "kernel.release").write_text(kver + "\n")

    _run(["dropbearkey", "-t", "ed25519", "-f", str(d / "guest_host_key")])
    pub = next(ln for ln in _run(["dropbearkey", "-y", "-f", str(d / "guest_host_key")]).splitlines()
               if ln.startswith("ssh-"))
    (d / "guest_host_key.pub").write_text(" ".join(pub.split()[:2]) + "\n")
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleetbisect-lab-guest",
          "-f", str(d / "guest_user_key")])
    (d / "guest_user_key").chmod(0o600)

    img = CpioWriter()
    add_busybox(img)
    add_binary(img, Path("/usr/sbin/dropbear"))
    add_binary(img, Path("/usr/bin/scp"))
    add_binary(img, Path("/usr/lib/openssh/sftp-server"))
    img.add_symlink("usr/lib/sftp-server", "openssh/sftp-server")  # where dropbear looks
    mods = unpacked / "lib" / "modules" / kver / "kernel"
    for rel in MODULES:
        img.add_file(f"lib/modules/fleetbisect/{Path(rel).name}", _module(mods / rel), 0o644)
    img.add_file("etc/dropbear/host_key", (d / "guest_host_key").read_bytes(), 0o600)
    img.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    img.add_file("etc/group", b"root:x:0:\n")
    img.add_file("etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o600)
    img.add_file("etc/shells", b"/bin/sh\n")
    img.add_file("etc/nsswitch.conf", b"passwd: files\ngroup: files\nshadow: files\n")
    img.add_dir("root", 0o700)
    img.add_dir("root/.ssh", 0o700)
    img.add_file("root/.ssh/authorized_keys", (d / "guest_user_key.pub").read_bytes(), 0o600)
    img.add_dir("etc/fleetbisect/init.d")
    img.add_file("init", _init().encode(), 0o755)
    img.write_gz(d / "base-initramfs.img")
    shutil.rmtree(dl)
    shutil.rmtree(unpacked)


def _module(path: Path) -> bytes:
    """A module's plain ELF bytes. Debian 12 ships plain `.ko`; later releases compress them
    (`.ko.xz`, `.ko.zst`), which busybox's insmod cannot load, so they are unpacked here."""
    if path.exists():
        return path.read_bytes()
    xz = path.with_name(path.name + ".xz")
    if xz.exists():
        return lzma.decompress(xz.read_bytes())
    zst = path.with_name(path.name + ".zst")
    if zst.exists():
        if not shutil.which("zstd"):
            raise InfraError(f"lab image: {zst.name} is zstd-compressed: install zstd to unpack it")
        return _run_bytes(["zstd", "-dc", str(zst)])
    raise InfraError(f"lab image: the kernel package has no module {path.name} (.ko, .ko.xz or .ko.zst)")


def _run_bytes(argv: list[str]) -> bytes:
    proc = subprocess.run(argv, capture_output=True)
    if proc.returncode != 0:
        raise InfraError(f"lab image: `{' '.join(argv)}` failed: {proc.stderr.decode(errors='replace')[-500:]}")
    return proc.stdout


def _init() -> str:
    modules = " ".join(Path(m).name for m in MODULES)
    return f"""#!/bin/sh
# fleetbisect lab guest init (PID 1). Hooks in /etc/fleetbisect/init.d come from the per-commit
# overlay; they are where the lab repo's seeded regressions live.
{MOUNTS}
for m in {modules}; do insmod /lib/modules/fleetbisect/$m || echo "init: insmod $m failed" > /dev/ttyS0; done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
export HOME=/root
for hook in /etc/fleetbisect/init.d/*; do
  [ -x "$hook" ] && "$hook"
done
if [ ! -e /etc/fleetbisect/no-ssh ]; then
  # -W: dropbear's default 24 KiB receive window caps uploads (paramiko SFTP: 3.2 -> 4.5 MB/s)
  dropbear -r /etc/dropbear/host_key -p 22 -s -E -W 1048576 2>>/tmp/dropbear.log
fi
echo "FLEETBISECT-READY release=$(cat /etc/fleetbisect/release 2>/dev/null) uname=$(uname -r)" > /dev/ttyS0
while true; do sleep 3600; done
"""
