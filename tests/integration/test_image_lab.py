"""A disk image through a whole step on the real lab: the commit's guest built into an ext4
qcow2 (fleetbisect.lab.diskimage), pushed to the sshd host, converted and resized there by
qemu-img, booted by QEMU with root on that disk, checked, and converted afresh the next step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fleetbisect.step import Lab, run_step
from fleetbisect.ui import UI
from fleetbisect.verdict import OutcomeKind, Verdict

ROOT = Path(__file__).resolve().parents[2]
SIZE = 128 << 20

# Passes only when / is the disk (ext4 on /dev/vda, read-write), the disk carries the marker
# the initramfs does not have, and nothing an earlier boot wrote is on it (a fresh copy).
ON_DISK = ("grep -q '^/dev/vda / ext4 rw' /proc/mounts && cat /etc/fleetbisect/on-disk && "
           "test ! -e /root/written-by-an-earlier-boot && touch /root/written-by-an-earlier-boot && sync")


def image_playbook(playbook_variant):
    build = (f"make olddefconfig && make -j2 && PYTHONPATH={ROOT} {sys.executable} -m "
             "fleetbisect.lab.diskimage initramfs.img disk.qcow2 boot-initrd.img")
    return playbook_variant({
        "build": {"command": build},
        "artifacts": {"kernel": "arch/x86/boot/bzImage", "initrd": "boot-initrd.img", "image": "disk.qcow2"},
        "image": {"format": "raw", "size": "128M"},
        "boot": {"timeout": "120s"},
        "reproducer": [{"kind": "command", "command": ON_DISK, "timeout": "30s"}],
    })


def test_a_converted_disk_image_is_the_guests_root_and_is_fresh_each_step(
    tree, host_cfg, playbook_variant, lab_repo, tmp_path
):
    playbook, _ = image_playbook(playbook_variant)
    sha = lab_repo.shas[3]
    tree.checkout(sha)
    lab = Lab(tree.path, host_cfg, playbook, UI(quiet=True))
    rec = run_step(lab, 1, sha, "subject", tmp_path / "steps" / "a")
    assert rec.verdict is Verdict.GOOD, (rec.reason, rec.outcomes)
    assert [o.kind for o in rec.outcomes] == [OutcomeKind.PASS]
    # The guest ran this very build (its release stamp is on the disk) ...
    assert rec.release.endswith(f"-fb{sha[:12]}")
    # ... from the disk: the command saw / on /dev/vda and the disk's marker.
    log = (tmp_path / "steps" / "a" / "reproducer.log").read_text()
    assert "the guest's root is the disk image" in log
    assert rec.pushed["image"] > 0
    # QEMU booted the converted raw disk, not the pushed blob.
    disk = f"{host_cfg.work_dir}/disk.raw"
    assert f"file={disk},if=virtio,format=raw" in (tmp_path / "steps" / "a" / "commands.txt").read_text()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", disk], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["format"] == "raw" and info["virtual-size"] == SIZE
    blobs = list(Path(host_cfg.work_dir, "blobs").glob("*.sparse"))
    assert len(blobs) == 1 and blobs[0].read_bytes()[:4] == b"QFI\xfb"  # the pushed qcow2, as it was
    assert not list(Path(host_cfg.work_dir).glob(".disk.raw*"))  # no temp file left

    # The same commit again: the image is not sent again, and the guest gets a fresh disk
    # (the file the first boot wrote is gone, or the reproducer fails).
    rec2 = run_step(lab, 2, sha, "subject", tmp_path / "steps" / "b")
    assert rec2.verdict is Verdict.GOOD, (rec2.reason, rec2.outcomes)
    assert "image" not in rec2.pushed
