"""The lab's disk image helper: an initramfs (several cpio archives end to end) unpacked as
the kernel would unpack it, and a digest that ignores what a rebuild changes."""

from __future__ import annotations

import gzip
import os
import stat

from fleetbisect.lab.cpio import CpioWriter
from fleetbisect.lab.diskimage import content_digest, read_cpio, unpack


def archive(files: dict[str, bytes], link: str | None = None) -> bytes:
    w = CpioWriter()
    for name, data in files.items():
        w.add_file(name, data, 0o600 if "key" in name else 0o755)
    if link:
        w.add_symlink(link, "busybox")
    return w.to_bytes()


def test_concatenated_archives_unpack_in_order_later_files_winning(tmp_path):
    base = archive({"bin/busybox": b"BB", "etc/key": b"secret", "etc/release": b"old"}, link="bin/sh")
    overlay = archive({"etc/release": b"6.1.0-fbabc"})
    img = tmp_path / "initramfs.img"
    img.write_bytes(gzip.compress(base) + gzip.compress(overlay))
    names = [n for n, *_ in read_cpio(gzip.decompress(img.read_bytes()))]
    assert names.count("etc/release") == 2 and "TRAILER!!!" not in names
    root = tmp_path / "root"
    root.mkdir()
    unpack(img, root)
    assert (root / "etc/release").read_bytes() == b"6.1.0-fbabc"
    assert stat.S_IMODE((root / "etc/key").stat().st_mode) == 0o600
    assert os.readlink(root / "bin/sh") == "busybox"


def test_the_digest_follows_the_files_not_the_archive(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(gzip.compress(archive({"etc/release": b"r1"}), mtime=1))
    b.write_bytes(gzip.compress(archive({"etc/release": b"r1"}), mtime=2))
    c.write_bytes(gzip.compress(archive({"etc/release": b"r2"}), mtime=1))
    assert a.read_bytes() != b.read_bytes()
    assert content_digest(a) == content_digest(b) != content_digest(c)
