"""A cpio "newc" archive writer: what the kernel unpacks as an initramfs.

Deterministic (mtime 0, inode numbers in order of addition, uid/gid 0), so the same inputs give
the same bytes and the push stage's content hash skips an unchanged initramfs. Several gzip'd
archives concatenated are one valid initramfs: the kernel unpacks them in order, later files
winning, which is how the lab layers a per-commit overlay on a shared base.
"""

from __future__ import annotations

import gzip
import stat
from pathlib import Path

TRAILER = "TRAILER!!!"


class CpioWriter:
    def __init__(self) -> None:
        self._entries: list[tuple[str, int, bytes, int, int]] = []  # name, mode, data, rdev maj, min
        self._names: set[str] = set()

    def _add(self, path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = path.strip("/")
        if not name or name in self._names:
            if name in self._names:
                raise ValueError(f"{path} is already in the archive")
            raise ValueError("an entry needs a name")
        parent = name.rpartition("/")[0]
        if parent and parent not in self._names:
            self.add_dir(parent)
        self._names.add(name)
        self._entries.append((name, mode, data, *rdev))

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = path.strip("/")
        if name in self._names:
            return
        self._add(name, stat.S_IFDIR | mode)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(path, stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        self._add(path, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(path, stat.S_IFCHR | mode, b"", (major, minor))

    def __contains__(self, path: str) -> bool:
        return path.strip("/") in self._names

    def to_bytes(self) -> bytes:
        out = bytearray()
        for ino, (name, mode, data, rmaj, rmin) in enumerate(self._entries, start=1):
            out += _header(name, ino, mode, len(data), 2 if stat.S_ISDIR(mode) else 1, rmaj, rmin)
            out += data
            out += _pad(len(out))
        out += _header(TRAILER, 0, 0, 0, 1, 0, 0)
        return bytes(out)

    def write_gz(self, dest: Path) -> Path:
        dest.write_bytes(gzip.compress(self.to_bytes(), compresslevel=6, mtime=0))
        return dest


def _header(name: str, ino: int, mode: int, size: int, nlink: int, rmaj: int, rmin: int) -> bytes:
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, len(encoded), 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
    return head + b"\0" * ((4 - len(head) % 4) % 4)


def _pad(length: int) -> bytes:
    return b"\0" * ((4 - length % 4) % 4)
