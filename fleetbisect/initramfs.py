"""Initramfs images built in Python: binaries with the shared libraries they need, busybox,
and an /init. Used by the lab's guest image and by `fleetbisect initramfs build`, which turns a
reproducer program or script into an init-as-reproducer image:

    fleetbisect initramfs build ./repro.sh -o initramfs.img

Its /init mounts the usual filesystems, prints the running kernel's release, runs the
reproducer as a child of PID 1 under a timeout, prints `FLEETBISECT-RESULT: PASS` (exit 0) or
`FLEETBISECT-RESULT: FAIL exit=N` on the serial console, and powers off. No network, no SSH:
the `console` reproducer reads the verdict from the console file on the host.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from .errors import UserError
from .lab.cpio import CpioWriter

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")

MOUNTS = """\
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
"""


def busybox() -> Path:
    for p in BUSYBOX_CANDIDATES:
        if os.access(p, os.X_OK):
            return Path(p)
    raise UserError("busybox is needed (Debian: apt-get install busybox-static)")


def shared_libs(binary: Path) -> list[Path]:
    """The shared libraries (and the dynamic loader) a binary needs, from `ldd`; [] if static."""
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if proc.returncode != 0:
        if "not a dynamic executable" in proc.stdout + proc.stderr:
            return []
        raise UserError(f"ldd {binary}: {(proc.stderr or proc.stdout).strip()}")
    if "not found" in proc.stdout:
        missing = [ln.split()[0] for ln in proc.stdout.splitlines() if "not found" in ln]
        raise UserError(f"{binary} needs libraries this machine lacks: {', '.join(missing)}")
    return [Path(m.group(1)) for m in _LDD_LINE.finditer(proc.stdout)]


def add_binary(img: CpioWriter, src: Path, dest: str | None = None, mode: int = 0o755) -> None:
    """A program at `dest` (default: its own path) with every library it links, at their paths."""
    img.add_file(dest or str(src), Path(src).read_bytes(), mode)
    for lib in shared_libs(Path(src)):
        if str(lib) not in img:
            img.add_file(str(lib), lib.resolve().read_bytes(), 0o755)


def add_busybox(img: CpioWriter) -> None:
    add_binary(img, busybox(), "bin/busybox")  # busybox-static: no libraries
    img.add_symlink("bin/sh", "busybox")
    for d in ("sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev", "run"):
        img.add_dir(d)
    # The console must exist before devtmpfs is mounted, or init starts without stdout.
    img.add_chardev("dev/console", 5, 1)


def _interpreter(script: Path) -> str | None:
    head = script.read_bytes()[:256]
    if not head.startswith(b"#!"):
        return None
    return head[2:].split(b"\n", 1)[0].decode(errors="replace").split()[0]


def reproducer_init(timeout: int) -> str:
    return f"""#!/bin/sh
{MOUNTS}
echo "FLEETBISECT-READY release=$(uname -r) uname=$(uname -r)" > /dev/console
cd /tmp
timeout -s KILL {timeout} /repro > /dev/console 2>&1
status=$?
if [ "$status" -eq 0 ]; then
  echo "FLEETBISECT-RESULT: PASS" > /dev/console
else
  echo "FLEETBISECT-RESULT: FAIL exit=$status" > /dev/console
fi
sync
poweroff -f
"""


def build_reproducer_image(repro: Path, output: Path, *, timeout: int = 600,
                           files: list[Path] = ()) -> Path:
    """`fleetbisect initramfs build`: an init-as-reproducer image around `repro`."""
    repro = Path(repro)
    if not repro.is_file():
        raise UserError(f"{repro}: no such reproducer")
    if not os.access(repro, os.X_OK):
        raise UserError(f"{repro} is not executable (chmod +x it)")
    img = CpioWriter()
    add_busybox(img)
    interp = _interpreter(repro)
    if interp is None:
        add_binary(img, repro, "repro")
    else:
        img.add_file("repro", repro.read_bytes(), 0o755)
        if interp not in ("/bin/sh", "/bin/busybox") and interp not in img:
            if not os.access(interp, os.X_OK):
                raise UserError(f"{repro} wants the interpreter {interp}, which this machine lacks")
            add_binary(img, Path(interp))
    for extra in files:
        add_binary(img, Path(extra).resolve(), f"usr/bin/{Path(extra).name}")
    img.add_file("init", reproducer_init(timeout).encode(), 0o755)
    output.parent.mkdir(parents=True, exist_ok=True)
    return img.write_gz(output)
