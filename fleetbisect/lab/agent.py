"""The lab guest with the QEMU guest agent: an initramfs overlay that runs qemu-ga.

    overlay = ensure_agent_overlay(ensure_assets())
    # a build appends it to its initramfs (cpio archives concatenate; later files win):
    #   make olddefconfig && make -j2 && cat OVERLAY >> initramfs.img

The overlay holds Debian's `qemu-ga` (package qemu-guest-agent) with the libraries `ldd` lists
and an init hook (/etc/fleetbisect/init.d, run by the lab's /init) that starts it on the
virtio-serial port named org.qemu.guest_agent.0. Without udev there is no
/dev/virtio-ports/NAME link, so the hook finds the port by its name in sysfs and makes the
link itself. It waits for the port in the background (the port appears once QEMU's side is
announced), so a guest booted without the agent channel boots as fast as ever; the base
image loads virtio_console (a module in Debian's cloud kernel) for every guest.

Built once per qemu-ga binary into the assets' directory, atomically, under a lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from ..errors import InfraError
from ..initramfs import add_binary
from .cpio import CpioWriter
from .image import LabAssets

QEMU_GA_CANDIDATES = ("/usr/sbin/qemu-ga", "/usr/bin/qemu-ga")
PORT_NAME = "org.qemu.guest_agent.0"

HOOK = f"""#!/bin/sh
# the QEMU guest agent on its virtio-serial port, found by name (no udev here)
(
  i=0
  while [ "$i" -lt 100 ]; do
    for p in /sys/class/virtio-ports/*; do
      [ "$(cat "$p/name" 2>/dev/null)" = {PORT_NAME} ] || continue
      mkdir -p /dev/virtio-ports
      ln -sf "/dev/${{p##*/}}" /dev/virtio-ports/{PORT_NAME}
      exec qemu-ga -m virtio-serial -p /dev/virtio-ports/{PORT_NAME} -f /run/qemu-ga.pid -t /run \\
        -l /tmp/qemu-ga.log </dev/null
    done
    usleep 100000
    i=$((i + 1))
  done
  echo "qemu-ga: no virtio-serial port named {PORT_NAME}" > /dev/ttyS0
) &
"""


def qemu_ga() -> Path:
    for p in QEMU_GA_CANDIDATES:
        if os.access(p, os.X_OK):
            return Path(p)
    raise InfraError("the lab's agent guest needs qemu-ga (Debian: apt-get install qemu-guest-agent; "
                     ".ci/setup installs it)")


def ensure_agent_overlay(assets: LabAssets) -> Path:
    """The overlay's path (a gzip'd cpio), built if this qemu-ga has none yet."""
    binary = qemu_ga()
    digest = hashlib.sha256(binary.read_bytes() + HOOK.encode()).hexdigest()[:16]
    final = assets.dir / f"agent-overlay-{digest}.img"
    if final.exists():
        return final
    with open(assets.dir / ".agent.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.exists():
            img = CpioWriter()
            add_binary(img, binary, "usr/sbin/qemu-ga")
            img.add_file("etc/fleetbisect/init.d/10-qemu-ga", HOOK.encode(), 0o755)
            tmp = final.with_name(f".{final.name}.{os.getpid()}")
            img.write_gz(tmp)
            tmp.replace(final)
    return final


def append_overlay_command(build_command: str, overlay: Path, initrd: str = "initramfs.img") -> str:
    """A lab build command that also puts the agent into the guest's initramfs."""
    import shlex

    return f"{build_command} && cat {shlex.quote(str(overlay))} >> {shlex.quote(initrd)}"


__all__ = ["PORT_NAME", "append_overlay_command", "ensure_agent_overlay", "qemu_ga"]
