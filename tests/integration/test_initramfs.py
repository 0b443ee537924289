"""`fleetbisect initramfs build`: a reproducer packed as init, booted for real under QEMU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fleetbisect.lab.vmhost import free_port

REPRO = """#!/bin/sh
echo "repro: round 1 ok"
[ -e /proc/version ] || exit 3
exit {status}
"""


def boot(assets, initrd, console, timeout=90):
    """Boot the lab kernel with `initrd` and wait until QEMU exits (init powers off)."""
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "256", "-smp", "1",
         "-display", "none", "-no-reboot", "-serial", f"file:{console}", "-monitor", "none",
         "-kernel", str(assets.kernel), "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1",
         "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{free_port()}-:22", "-device", "virtio-net-pci,netdev=n0,romfile="],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass  # the caller's assertion on the exit says it did not power off
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, console.read_text(errors="replace")


@pytest.mark.parametrize("status,verdict", [(0, "FLEETBISECT-RESULT: PASS"), (7, "FLEETBISECT-RESULT: FAIL exit=7")])
def test_built_image_runs_the_reproducer_as_init_and_powers_off(assets, tmp_path, status, verdict):
    repro = tmp_path / "repro.sh"
    repro.write_text(REPRO.format(status=status))
    repro.chmod(0o755)
    out = tmp_path / "initramfs.img"
    p = subprocess.run([sys.executable, "-m", "fleetbisect", "initramfs", "build", str(repro), "-o", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    code, text = boot(assets, out, tmp_path / "console.log")
    assert "repro: round 1 ok" in text
    assert verdict in text
    assert f"FLEETBISECT-READY release={assets.kernel_release}" in text
    assert code == 0  # QEMU exited by itself (-no-reboot): init powered the guest off


def test_a_reproducer_that_is_not_executable_is_a_clear_error(tmp_path):
    repro = tmp_path / "repro.sh"
    repro.write_text("#!/bin/sh\n")
    p = subprocess.run([sys.executable, "-m", "fleetbisect", "initramfs", "build", str(repro), "-o",
                        str(tmp_path / "x.img")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not executable" in p.stderr and "Traceback" not in p.stderr
