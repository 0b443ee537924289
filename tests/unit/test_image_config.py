"""Disk images in the playbook, on the QEMU command line, and through the push stage."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from fleetbisect.config.playbook import load_playbook
from fleetbisect.deadline import Deadline
from fleetbisect.errors import ConfigError
from fleetbisect.remote.fake import FakeRemote
from fleetbisect.stages.build import sha256_file
from fleetbisect.stages.push import push
from fleetbisect.targets.qemu import Qemu, VMPaths, qemu_argv

ROOT = Path(__file__).resolve().parents[2]
REPRO = 'reproducer: {kind: command, command: "true", timeout: 30s}\n'


def playbook(tmp_path, text: str):
    path = tmp_path / "pb.yaml"
    path.write_text("name: t\n" + text + REPRO)
    return load_playbook(path)


def refused(tmp_path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        playbook(tmp_path, text)
    return str(e.value)


def test_an_image_only_playbook_loads_with_the_image_defaults(tmp_path):
    pb = playbook(tmp_path, "artifacts: {image: result/nixos.qcow2}\n")
    assert pb.disk_image is not None
    assert (pb.disk_image.format, pb.disk_image.size, pb.disk_image.dest, pb.disk_image.send) == (
        "raw", None, None, "sparse")
    # A kernel-only playbook has no disk image, whatever the defaults say.
    assert playbook(tmp_path, "artifacts: {kernel: k}\n").disk_image is None
    both = playbook(tmp_path, "artifacts: {kernel: k, image: d.qcow2}\nimage: {size: 10G, format: qcow2}\n")
    assert both.disk_image.size == 10 << 30 and both.disk_image.format == "qcow2"


def test_image_mistakes_are_named_at_their_line(tmp_path):
    assert "pb.yaml:3 image: says how to deploy a disk image, and artifacts has no `image`" in refused(
        tmp_path, "artifacts: {kernel: k}\nimage: {size: 10G}\n")
    assert "pb.yaml:2 artifacts: " in refused(tmp_path, "artifacts: {initrd: i, image: d}\n")
    assert "an initrd is booted with a kernel" in refused(tmp_path, "artifacts: {initrd: i, image: d}\n")
    assert "needs a kernel artifact" in refused(tmp_path, "artifacts: {}\n")
    assert "valid: kernel, initrd, image" in refused(tmp_path, "artifacts: {disk: d}\n")
    assert "image.dest: " in refused(tmp_path, "artifacts: {image: d}\nimage: {dest: disk.raw}\n")
    assert "image.dest: " in refused(tmp_path, "artifacts: {image: d}\nimage: {dest: /a/../b}\n")
    assert "image.format: " in refused(tmp_path, "artifacts: {image: d}\nimage: {format: vmdk}\n")
    assert "image.size: " in refused(tmp_path, "artifacts: {image: d}\nimage: {size: lots}\n")


def test_the_field_playbook_ships_and_says_what_the_field_does():
    pb = load_playbook(ROOT / "playbooks" / "nixos-image.yaml")
    assert pb.artifacts == {"image": "result/nixos.qcow2"}
    assert pb.build.command.startswith("nix build") and ".#qemuImage" in pb.build.command
    assert (pb.disk_image.format, pb.disk_image.size) == ("raw", 10 << 30)
    assert pb.reproducers[0].kind == "scp-stress"


# --- QEMU ------------------------------------------------------------------------------------


def make_target():
    guest = SimpleNamespace(address="127.0.0.1", port=10022, has_agent=False)
    target = SimpleNamespace(qemu="qemu-system-x86_64", machine="q35", accel="tcg", guest=guest)
    boot = SimpleNamespace(memory=512, cpus=1, cmdline="console=ttyS0 root=/dev/vda", root=None, qemu_args=[])
    return target, boot


def test_an_image_alone_boots_with_its_own_bootloader():
    target, boot = make_target()
    argv = qemu_argv(target, boot, kernel=None, initrd=None, paths=VMPaths("/w/vm"),
                     disk=("/w/disk,1.raw", "raw"))
    assert "-kernel" not in argv and "-append" not in argv and "-initrd" not in argv
    # writable (a fresh copy each step), and a comma in the path cannot add an option
    assert argv[argv.index("-drive") + 1] == "file=/w/disk,,1.raw,if=virtio,format=raw"


def test_an_image_beside_a_kernel_is_the_disk_of_a_direct_kernel_boot():
    target, boot = make_target()
    argv = qemu_argv(target, boot, kernel="/b/k", initrd="/b/i", paths=VMPaths("/w/vm"),
                     disk=("/w/disk.qcow2", "qcow2"))
    assert argv[argv.index("-kernel") + 1] == "/b/k"
    assert argv[argv.index("-append") + 1] == "console=ttyS0 root=/dev/vda"
    assert argv[argv.index("-drive") + 1] == "file=/w/disk.qcow2,if=virtio,format=qcow2"


def test_the_qemu_target_deploys_the_image_then_boots_the_converted_disk(tmp_path):
    pb = playbook(tmp_path, "artifacts: {kernel: k, image: d.qcow2}\nimage: {dest: /srv/repro.raw}\n")
    host_cfg = SimpleNamespace(work_dir="/w", target=SimpleNamespace(
        qemu="qemu-system-x86_64", machine="q35", accel="tcg",
        guest=SimpleNamespace(address="127.0.0.1", port=10022, has_agent=False), pci=[], virtiofs=None))
    host = FakeRemote("vmhost")
    host.on(re.compile(r"^qemu-img info"), stdout='{"format": "qcow2", "virtual-size": 1048576}')
    host.on(re.compile(r"^df "), stdout="F 1 U A C M\n/dev/x 1 1 99999999 1% /\n")
    target = Qemu(host_cfg, pb)
    artifacts = {"kernel": "/w/blobs/kk", "image": "/w/blobs/ii.sparse"}
    target.deploy(host, artifacts, tmp_path, Deadline.after(60))
    target.start(host, artifacts, tmp_path, Deadline.after(60))
    cmds = host.commands()
    convert = next(i for i, c in enumerate(cmds) if c.startswith("qemu-img convert"))
    boot = next(i for i, c in enumerate(cmds) if "qemu-system-x86_64" in c)
    assert convert < boot
    assert "file=/srv/repro.raw,if=virtio,format=raw" in shlex.split(cmds[boot])
    assert "file=/srv/repro.raw,if=virtio,format=raw" in (tmp_path / "commands.txt").read_text()


# --- push ------------------------------------------------------------------------------------


def sparse_raw(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-f", "raw", str(path), "64M"], check=True, capture_output=True)
    with open(path, "r+b") as f:
        f.seek(40 << 20)
        f.write(b"x" * 8192)
    return path


def test_a_raw_image_is_pushed_without_its_zeros_and_only_once(tmp_path):
    img = sparse_raw(tmp_path / "disk.img")
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k" * 1000)
    host = FakeRemote("vmhost")
    got = push(host, "/w", {"kernel": kernel, "image": img}, Deadline.after(60))
    sha = sha256_file(img)
    assert got.remote_paths["image"] == f"/w/blobs/{sha}.sparse"
    assert got.remote_paths["kernel"] == f"/w/blobs/{sha256_file(kernel)}"
    assert got.uploaded["kernel"] == 1000
    assert 8192 < got.uploaded["image"] < (1 << 20)  # a qcow2 of one cluster, not 64 MiB
    staged = next(p for p, data in host.files.items() if p.startswith(f"/w/staging/{sha}.sparse"))
    assert host.files[staged][:4] == b"QFI\xfb"  # what travelled is a qcow2
    assert any("mv -f" in c and f"{staged} /w/blobs/{sha}.sparse" in c for c in host.commands())

    # The host has it now: the next push sends nothing.
    host.on(re.compile(r"^sh -c"), stdout=f"{sha}.sparse\n{sha256_file(kernel)}\n")
    again = push(host, "/w", {"kernel": kernel, "image": img}, Deadline.after(60))
    assert again.uploaded == {}
    assert again.remote_paths == got.remote_paths


def test_a_plain_push_sends_the_file_as_built(tmp_path):
    img = sparse_raw(tmp_path / "disk.img")
    got = push(FakeRemote("vmhost"), "/w", {"image": img}, Deadline.after(60), image_send="plain")
    assert got.remote_paths["image"] == f"/w/blobs/{sha256_file(img)}.image"
    assert got.uploaded["image"] == 64 << 20


def test_old_image_blobs_are_pruned_apart_from_the_small_ones(tmp_path):
    """GB-sized image blobs: only the last KEEP_IMAGE_BLOBS stay; kernels keep their dozen."""
    from fleetbisect.remote.local import LocalRemote
    from fleetbisect.stages.push import KEEP_BLOBS, KEEP_IMAGE_BLOBS

    blobs = tmp_path / "work" / "blobs"
    blobs.mkdir(parents=True)
    for i in range(20):  # older blobs, oldest first
        for name in (f"{i:064x}", f"{i:064x}.sparse"):
            (blobs / name).write_bytes(b"old")
            os.utime(blobs / name, (1000 + i, 1000 + i))
    img, kernel = sparse_raw(tmp_path / "disk.img"), tmp_path / "bzImage"
    kernel.write_bytes(b"k" * 100)
    got = push(LocalRemote("here"), str(tmp_path / "work"), {"kernel": kernel, "image": img}, Deadline.after(60))
    left = sorted(p.name for p in blobs.iterdir())
    images = [n for n in left if "." in n]
    assert len(images) == KEEP_IMAGE_BLOBS and Path(got.remote_paths["image"]).name in images
    assert f"{19:064x}.sparse" in images  # the newest old one
    assert len(left) - len(images) == KEEP_BLOBS and Path(got.remote_paths["kernel"]).name in left
