"""The cpio writer against the system's cpio: what we write is what it lists and extracts."""

from __future__ import annotations

import gzip
import os
import re
import subprocess

from fleetbisect.lab.cpio import CpioWriter


def archive() -> CpioWriter:
    img = CpioWriter()
    img.add_file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    img.add_file("etc/odd-size", b"x" * 1023)
    img.add_symlink("bin/sh", "tool")
    img.add_dir("root/.ssh", 0o700)
    img.add_file("root/.ssh/authorized_keys", b"ssh-ed25519 AAAA test\n", 0o600)
    return img


def test_system_cpio_lists_and_extracts_what_we_wrote(tmp_path):
    path = archive().write_gz(tmp_path / "a.cpio.gz")
    raw = gzip.decompress(path.read_bytes())
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=raw, capture_output=True, check=True).stdout.decode()
    assert listing.split() == ["bin", "bin/tool", "etc", "etc/odd-size", "bin/sh", "root", "root/.ssh",
                               "root/.ssh/authorized_keys"]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=raw, cwd=out, check=True, capture_output=True)
    assert (out / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.stat(out / "bin/tool").st_mode & 0o777 == 0o755
    assert (out / "etc/odd-size").read_bytes() == b"x" * 1023
    assert os.readlink(out / "bin/sh") == "tool"
    assert os.stat(out / "root/.ssh/authorized_keys").st_mode & 0o777 == 0o600
    assert os.stat(out / "root/.ssh").st_mode & 0o777 == 0o700


def test_output_is_deterministic(tmp_path):
    a = archive().write_gz(tmp_path / "a.gz").read_bytes()
    b = archive().write_gz(tmp_path / "b.gz").read_bytes()
    assert a == b


def test_every_entry_is_four_byte_aligned():
    raw = archive().to_bytes()
    pos = 0
    while True:
        assert raw[pos:pos + 6] == b"070701" and pos % 4 == 0
        namesize, filesize = int(raw[pos + 94:pos + 102], 16), int(raw[pos + 54:pos + 62], 16)
        name = raw[pos + 110:pos + 110 + namesize - 1]
        pos += 110 + namesize
        pos += (4 - pos % 4) % 4
        pos += filesize
        pos += (4 - pos % 4) % 4
        if name == b"TRAILER!!!":
            break
    assert pos == len(raw)


def test_device_nodes_carry_their_numbers():
    img = CpioWriter()
    img.add_chardev("dev/console", 5, 1)
    raw = img.to_bytes()
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=raw, capture_output=True, check=True).stdout.decode()
    line = next(ln for ln in listing.splitlines() if ln.endswith("dev/console"))
    assert line.startswith("crw-------") and re.search(r"\b5,\s+1\b", line)
