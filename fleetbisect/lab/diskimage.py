"""The lab guest on a disk image, as a distribution's image build would hand it over.

    python -m fleetbisect.lab.diskimage initramfs.img disk.qcow2 boot-initrd.img [--size 64M]

Run in a lab repo's tree after `make` (the playbook's build command): the commit's guest
(`initramfs.img`: the lab's base initramfs and this commit's overlay, with its release stamp)
is unpacked into a directory and made into an ext4 filesystem with `mkfs.ext4 -d` (no mount,
no loop device, no root needed), converted to qcow2 with `qemu-img` (the `image` artifact).
`boot-initrd.img` (the `initrd` artifact) is a small initramfs that loads virtio and
virtio_blk (modules in Debian's kernels; ext4 is built in), mounts /dev/vda read-write as the
root and `switch_root`s to the disk's own /init: from then on the guest runs from the disk.
The disk also holds /etc/fleetbisect/on-disk, a file the initramfs does not have, so a test
can tell where the guest's root is.

virtio_blk.ko comes from the same kernel package as the lab's kernel (fetched with `apt-get
download` once, cached beside the lab's assets). An initramfs whose files are unchanged leaves the
disk image as it is (their digest is kept in `disk.qcow2.source`; mkfs.ext4 would stamp a new
UUID and new times), so an unchanged commit pushes nothing.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from ..initramfs import add_busybox
from .cpio import TRAILER, CpioWriter
from .image import _kernel_package, _module, _run, cache_root, ensure_assets

RECIPE = "disk-v1"
MARKER = "etc/fleetbisect/on-disk"
BOOT_MODULES = ("virtio_ring.ko", "virtio.ko", "virtio_pci_legacy_dev.ko", "virtio_pci_modern_dev.ko",
                "virtio_pci.ko", "virtio_blk.ko")

BOOT_INIT = """#!/bin/sh
# fleetbisect lab: find the root disk, make it the root, run its /init
/bin/busybox --install -s
export PATH=/sbin:/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do insmod /lib/modules/$m || echo "boot: insmod $m failed" > /dev/console; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
if ! mount -t ext4 -o rw /dev/vda /newroot; then
  echo "boot: cannot mount /dev/vda" > /dev/console
  poweroff -f
fi
umount /proc /sys /dev
exec switch_root /newroot /init
"""


def read_cpio(data: bytes):
    """(name, mode, data, rdev) of every entry of newc archives laid end to end (an initramfs
    made of several), trailers skipped."""
    pos = 0
    while pos + 110 <= len(data):
        if data[pos:pos + 6] != b"070701":
            if data[pos:pos + 4] == b"\0\0\0\0":  # padding between archives
                pos += 4
                continue
            raise ValueError(f"not a newc cpio archive at byte {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos = _align(pos + 110 + namesize)
        body = data[pos:pos + size]
        pos = _align(pos + size)
        if name != TRAILER:
            yield name, mode, body, os.makedev(rmaj, rmin)


def _align(n: int) -> int:
    return (n + 3) & ~3


def unpack(initramfs: Path, dest: Path) -> None:
    """The initramfs's files into `dest`, later entries winning (as the kernel unpacks it).
    Device nodes only when this process may make them (root): devtmpfs provides /dev anyway."""
    for name, mode, body, rdev in read_cpio(gzip.decompress(initramfs.read_bytes())):
        name = name.lstrip("/")
        if name in ("", ".") or ".." in name.split("/"):
            continue
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
        if stat.S_ISDIR(mode):
            path.mkdir(exist_ok=True)
            path.chmod(stat.S_IMODE(mode))
        elif stat.S_ISLNK(mode):
            path.symlink_to(body.decode())
        elif stat.S_ISREG(mode):
            path.write_bytes(body)
            path.chmod(stat.S_IMODE(mode))
        elif stat.S_ISCHR(mode) and os.geteuid() == 0:
            os.mknod(path, mode, rdev)


def virtio_blk(assets=None) -> Path:
    """virtio_blk.ko of the lab kernel's own package, cached."""
    assets = assets or ensure_assets()
    root = cache_root()
    final = root / f"{assets.dir.name}-{RECIPE}"
    module = final / "virtio_blk.ko"
    if module.exists():
        return module
    with open(root / ".disk-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not module.exists():
            package, version = _kernel_package(root)
            tmp = Path(tempfile.mkdtemp(prefix=".disk-build-", dir=root))
            try:
                dl = tmp / "download"
                dl.mkdir()
                dl.chmod(0o777)
                _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=dl)
                (deb,) = dl.glob("*.deb")
                _run(["dpkg", "-x", str(deb), str(tmp / "unpacked")])
                kver = package.removeprefix("linux-image-")
                blk = _module(tmp / "unpacked" / "lib" / "modules" / kver / "kernel" / "drivers" / "block" / "virtio_blk.ko")
                final.mkdir(parents=True, exist_ok=True)
                part = final / "virtio_blk.ko.part"
                part.write_bytes(blk)
                part.rename(module)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return module


def boot_initrd(base: Path, blk_module: Path, dest: Path) -> Path:
    """The initramfs that makes /dev/vda the root (modules from the lab's base initramfs)."""
    mods = {Path(name).name: body for name, _, body, _ in read_cpio(gzip.decompress(base.read_bytes()))
            if name.startswith("lib/modules/fleetbisect/")}
    mods["virtio_blk.ko"] = blk_module.read_bytes()
    img = CpioWriter()
    add_busybox(img)
    for name in BOOT_MODULES:
        img.add_file(f"lib/modules/{name}", mods[name], 0o644)
    img.add_file("init", BOOT_INIT.format(modules=" ".join(BOOT_MODULES)).encode(), 0o755)
    tmp = dest.with_name(dest.name + ".tmp")
    img.write_gz(tmp)
    tmp.replace(dest)
    return dest


def content_digest(initramfs: Path) -> str:
    """sha256 of what the guest sees (names, modes, contents; not the archive's timestamps,
    which a rebuild of the same commit changes)."""
    h = hashlib.sha256()
    for name, mode, body, rdev in read_cpio(gzip.decompress(initramfs.read_bytes())):
        h.update(b"%s\0%o\0%d\0%d\0" % (name.encode(), mode, rdev, len(body)) + body)
    return h.hexdigest()


def disk_image(initramfs: Path, dest: Path, size: str = "64M") -> bool:
    """`initramfs`'s guest as an ext4 qcow2 at `dest`; False when it was already that."""
    digest = content_digest(initramfs)
    source = dest.with_name(dest.name + ".source")
    if dest.exists() and source.exists() and source.read_text().strip() == digest:
        return False
    with tempfile.TemporaryDirectory(prefix="fleetbisect-disk-") as tmp:
        root, raw = Path(tmp) / "root", Path(tmp) / "disk.raw"
        root.mkdir()
        unpack(initramfs, root)
        (root / MARKER).parent.mkdir(parents=True, exist_ok=True)
        (root / MARKER).write_text("the guest's root is the disk image\n")
        _run(["mkfs.ext4", "-q", "-F", "-L", "fbroot", "-E", "root_owner=0:0", "-d", str(root), str(raw), size])
        part = dest.with_name(dest.name + ".tmp")
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(part)])
        part.replace(dest)
    source.write_text(digest + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("initramfs", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("boot_initrd", type=Path)
    ap.add_argument("--size", default="64M")
    args = ap.parse_args(argv)
    assets = ensure_assets()
    made = disk_image(args.initramfs, args.image, args.size)
    boot_initrd(assets.base_initramfs, virtio_blk(assets), args.boot_initrd)
    print(f"  IMAGE   {args.image} ({'made' if made else 'unchanged'}), {args.boot_initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
