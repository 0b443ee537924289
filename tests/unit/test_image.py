"""Disk image deployment (stages/image.py): the commands built, the free-space refusal and the
keep-the-previous-disk-until-complete ordering against a scripted host; the same end to end
with the real qemu-img on this machine (LocalRemote), including a conversion that fails."""

from __future__ import annotations

import json
import re
import shlex
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from fleetbisect.deadline import Deadline
from fleetbisect.remote.fake import FakeRemote
from fleetbisect.remote.local import LocalRemote
from fleetbisect.stages import image
from fleetbisect.stages.image import ImageError, deploy_image

G = 1 << 30
BLOB = "/srv/fb work/blobs/abc.sparse"


def spec(**kw):
    return SimpleNamespace(**{"format": "raw", "size": 10 * G, "dest": None, "send": "sparse", **kw})


def host_with(*, fmt="qcow2", virtual=2 * G, free_kib=50 * (G >> 10), convert_exit=0):
    host = FakeRemote("vmhost")
    host.on(re.compile(r"^qemu-img info"),
            stdout=json.dumps({"format": fmt, "virtual-size": virtual, "filename": BLOB}))
    host.on(re.compile(r"^df -Pk"),
            stdout=f"Filesystem 1024-blocks Used Available Capacity Mounted on\n"
                   f"/dev/sda1 100000000 1000 {free_kib} 1% /srv\n")
    host.on(re.compile(r"^qemu-img convert"), exit_status=convert_exit, stderr="convert: I/O error")
    return host


def argvs(host: FakeRemote) -> list[list[str]]:
    return [shlex.split(c) for c in host.commands()]


def test_the_commands_are_argv_lists_converting_into_a_temp_name_renamed_last():
    host = host_with()
    dest = deploy_image(host, BLOB, spec(), "/srv/fb work", Deadline.after(60))
    tmp = "/srv/fb work/.disk.raw.fleetbisect-tmp"
    assert dest == "/srv/fb work/disk.raw"
    assert argvs(host) == [
        ["qemu-img", "info", "--output=json", BLOB],
        ["mkdir", "-p", "/srv/fb work"],
        ["rm", "-f", tmp],
        ["df", "-Pk", "/srv/fb work"],
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", BLOB, tmp],
        ["qemu-img", "resize", "-f", "raw", tmp, str(10 * G)],
        ["mv", "-f", tmp, dest],
    ]
    # The pushed blob is only ever read: no command writes, moves or removes it.
    for argv in argvs(host):
        if BLOB in argv:
            assert argv[:2] == ["qemu-img", "info"] or argv[-2] == BLOB


def test_the_previous_disk_is_untouched_until_the_new_one_is_complete():
    host = host_with()
    dest = deploy_image(host, BLOB, spec(dest="/var/lib/libvirt/images/repro,vm.raw"), "/w", Deadline.after(60))
    cmds = argvs(host)
    touching_dest = [i for i, a in enumerate(cmds) if dest in a]
    assert touching_dest == [len(cmds) - 1], cmds  # only the final rename names DEST
    assert cmds[-1] == ["mv", "-f", "/var/lib/libvirt/images/.repro,vm.raw.fleetbisect-tmp", dest]
    convert = next(i for i, a in enumerate(cmds) if a[:2] == ["qemu-img", "convert"])
    resize = next(i for i, a in enumerate(cmds) if a[:2] == ["qemu-img", "resize"])
    assert convert < resize < len(cmds) - 1


def test_a_failed_conversion_removes_the_temp_file_and_never_renames():
    host = host_with(convert_exit=1)
    with pytest.raises(ImageError, match="qemu-img convert failed .*I/O error"):
        deploy_image(host, BLOB, spec(), "/w", Deadline.after(60))
    cmds = argvs(host)
    assert cmds[-1] == ["rm", "-f", "/w/.disk.raw.fleetbisect-tmp"]
    assert not any(a[0] == "mv" for a in cmds)


def test_not_enough_space_is_an_infra_error_naming_the_numbers_before_any_conversion():
    host = host_with(virtual=2 * G, free_kib=(4 * G) >> 10)
    with pytest.raises(ImageError) as e:
        deploy_image(host, BLOB, spec(size=10 * G), "/w", Deadline.after(60))
    msg = str(e.value)
    assert "not enough space" in msg and "/w" in msg
    assert f"({10 * G} bytes) needed" in msg and f"({4 * G} bytes) free" in msg
    assert not any(a[:2] == ["qemu-img", "convert"] for a in argvs(host))
    # Without image.size, the image's own virtual size is what must fit.
    host = host_with(virtual=5 * G, free_kib=(4 * G) >> 10)
    with pytest.raises(ImageError, match=f"\\({5 * G} bytes\\) needed"):
        deploy_image(host, BLOB, spec(size=None), "/w", Deadline.after(60))


def test_enough_space_exactly_and_no_resize_when_the_size_is_the_images_own():
    host = host_with(virtual=10 * G, free_kib=(10 * G) >> 10)
    deploy_image(host, BLOB, spec(size=None, format="qcow2"), "/w", Deadline.after(60))
    cmds = argvs(host)
    assert ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", BLOB, "/w/.disk.qcow2.fleetbisect-tmp"] in cmds
    assert not any(a[:2] == ["qemu-img", "resize"] for a in cmds)
    assert cmds[-1] == ["mv", "-f", "/w/.disk.qcow2.fleetbisect-tmp", "/w/disk.qcow2"]


def test_a_disk_is_never_shrunk():
    host = host_with(virtual=20 * G)
    with pytest.raises(ImageError, match="smaller than the image's virtual size"):
        deploy_image(host, BLOB, spec(size=10 * G), "/w", Deadline.after(60))
    assert not any(a[:2] == ["qemu-img", "convert"] for a in argvs(host))


def test_an_unreadable_blob_or_df_is_a_clear_error():
    host = FakeRemote("vmhost")
    host.on(re.compile(r"^qemu-img info"), exit_status=1, stderr="Could not open: No such file")
    with pytest.raises(ImageError, match="cannot read the pushed image .*No such file"):
        deploy_image(host, BLOB, spec(), "/w", Deadline.after(60))
    with pytest.raises(ImageError, match="cannot read the free space"):
        image.parse_df("df: /w: No such file or directory\n", "/w")
    with pytest.raises(ImageError, match="no format and virtual size"):
        image.parse_info("{}", BLOB)


def test_what_travels():
    src, out = Path("/t/nixos.img"), Path("/tmp/x/image.qcow2")
    assert image.encode_argv(src, "raw", "sparse", out) == [
        "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "/t/nixos.img", "/tmp/x/image.qcow2"]
    assert image.encode_argv(src, "qcow2", "sparse", out) is None  # already sparse: as it is
    assert image.encode_argv(src, "raw", "plain", out) is None
    assert image.encode_argv(src, "qcow2", "compressed", out)[5:9] == [
        "qcow2", "-c", "-o", "compression_type=zstd"]
    assert image.blob_suffix("plain") == ".image" and image.blob_suffix("sparse") == ".sparse"


# --- the same with the real qemu-img, on this machine ---------------------------------------


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def make_qcow2(path: Path, marker: bytes, virtual: str = "16M") -> None:
    raw = path.with_suffix(".src.raw")
    qemu_img("create", "-f", "raw", str(raw), virtual)
    with open(raw, "r+b") as f:
        f.seek(1 << 20)
        f.write(marker)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    raw.unlink()


def test_real_conversion_and_resize_and_a_failure_keeps_the_old_disk(tmp_path):
    host = LocalRemote("here")
    blob = tmp_path / "blobs" / "aaa"
    blob.parent.mkdir()
    make_qcow2(blob, b"FIRST-IMAGE")
    before = blob.read_bytes()
    dest = deploy_image(host, str(blob), spec(size=64 << 20), str(tmp_path / "work"), Deadline.after(60))
    assert dest == str(tmp_path / "work" / "disk.raw")
    info = json.loads(qemu_img("info", "--output=json", dest))
    assert info["format"] == "raw" and info["virtual-size"] == 64 << 20
    data = Path(dest).read_bytes()
    assert data[1 << 20:(1 << 20) + 11] == b"FIRST-IMAGE"
    assert blob.read_bytes() == before  # the pushed original is untouched
    assert not (tmp_path / "work" / ".disk.raw.fleetbisect-tmp").exists()

    # A corrupt image (`qemu-img info` reads it, the conversion fails at its first cluster):
    # the previous disk is still there, whole, and no temp file is left.
    bad = tmp_path / "blobs" / "bbb"
    make_qcow2(bad, b"SECOND-IMAGE")
    with open(bad, "r+b") as f:  # point L1[0] at an unaligned L2 table
        f.seek(40)
        l1 = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1)
        f.write(struct.pack(">Q", entry + 0x200))
    with pytest.raises(ImageError, match="qemu-img convert failed"):
        deploy_image(host, str(bad), spec(size=64 << 20), str(tmp_path / "work"), Deadline.after(60))
    assert Path(dest).read_bytes() == data
    assert not (tmp_path / "work" / ".disk.raw.fleetbisect-tmp").exists()


def test_real_encode_sends_a_raw_image_without_its_zero_blocks(tmp_path):
    raw = tmp_path / "nixos.img"
    qemu_img("create", "-f", "raw", str(raw), "256M")
    with open(raw, "r+b") as f:
        f.seek(100 << 20)
        f.write(b"DATA" * 1024)
    sent = image.encode(raw, "sparse", tmp_path, Deadline.after(60))
    assert sent != raw and sent.stat().st_size < (2 << 20)
    assert qemu_img("compare", str(raw), str(sent)).startswith("Images are identical")
    assert image.encode(sent, "sparse", tmp_path / "x", Deadline.after(60)) == sent  # qcow2 as it is



def test_check_probes_qemu_img_and_the_room_for_the_disk():
    host = FakeRemote("vmhost")
    host.on("sh -c 'command -v qemu-img'", exit_status=1)
    host.on(re.compile(r"df -Pk"), stdout="F 1 U A C M\n/dev/x 1 1 1048576 1% /\n")  # 1 GiB free
    checks = image.probes(host, spec(dest="/var/lib/libvirt/images/new/repro.raw"), "/w", Deadline.after(10))
    assert [(c.name, c.ok) for c in checks] == [("qemu-img", False), ("disk image space", False)]
    assert "qemu-utils" in checks[0].detail
    assert "1.00 GiB" in checks[1].detail and "10.00 GiB" in checks[1].detail
    assert "/var/lib/libvirt/images/new" in host.commands()[-1]  # nothing made: the nearest that exists
    host.on("sh -c 'command -v qemu-img'", stdout="/usr/bin/qemu-img\n")
    assert all(c.ok for c in image.probes(host, spec(size=None), "/w", Deadline.after(10)))


def test_real_compressed_encoding_deploys_to_the_same_disk(tmp_path):
    raw = tmp_path / "nixos.img"
    qemu_img("create", "-f", "raw", str(raw), "32M")
    with open(raw, "r+b") as f:
        f.seek(3 << 20)
        f.write(b"compressible text " * 50000)
    sent = image.encode(raw, "compressed", tmp_path, Deadline.after(60))
    assert json.loads(qemu_img("info", "--output=json", str(sent)))["format-specific"]["data"][
        "compression-type"] == "zstd"
    (tmp_path / "s").mkdir()
    sparse = image.encode(raw, "sparse", tmp_path / "s", Deadline.after(60))
    assert sent.stat().st_size * 2 < sparse.stat().st_size  # ~900 KB of text: compressed clusters
    dest = deploy_image(LocalRemote("here"), str(sent), spec(size=None), str(tmp_path / "w"), Deadline.after(60))
    assert qemu_img("compare", "-f", "raw", "-F", "raw", str(raw), dest).startswith("Images are identical")
