"""The embedded lab's own pieces, each checked for real: the cached guest assets, the generated
kernel repo and its Makefile contract, and a built initramfs booted under QEMU (TCG) on this
machine, logged into with the baked-in keys, with the seeded network regression reproduced.

The repo is the session's `lab_repo` (24 commits, seed 7, culprit 13, build fails at 5, guest
without sshd at 9; see conftest.py). QEMU runs locally here, tracked by PID and killed in a
finally; the other lab tests start it through the VM host over SSH instead.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from fleetbisect.errors import InfraError
from fleetbisect.lab.image import ensure_assets
from fleetbisect.lab.kernelrepo import generate_repo
from fleetbisect.lab.vmhost import free_port

from .conftest import BUILD_FAILS, CULPRIT, NO_SSH

TRAILER = "Seeded-regression: true"
UPLOAD = 8 * 1024 * 1024


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def cpio_list(gz: bytes) -> list[str]:
    raw = gzip.decompress(gz)
    return subprocess.run(["cpio", "-it", "--quiet"], input=raw, capture_output=True, check=True).stdout.decode().split()


# --- (a) assets ---------------------------------------------------------------------------------

def test_assets_exist_and_a_cached_call_builds_nothing(assets, monkeypatch):
    for path in (assets.kernel, assets.base_initramfs, assets.guest_host_key_pub_file, assets.guest_user_key):
        assert path.is_file() and path.stat().st_size > 0, path
    assert assets.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage's boot protocol header
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-cloud-amd64", assets.kernel_release)
    assert re.fullmatch(r"ssh-ed25519 [A-Za-z0-9+/=]+", assets.guest_host_key_pub)
    assert assets.guest_host_key_pub_file.read_text().strip() == assets.guest_host_key_pub
    assert assets.guest_user_key.stat().st_mode & 0o777 == 0o600
    assert assets.guest_user == "root"
    paramiko.Ed25519Key.from_private_key_file(str(assets.guest_user_key))  # paramiko can use it

    # A cached call builds nothing and downloads nothing: only apt-config (where apt keeps its
    # lists, to see they did not change) may run.
    import fleetbisect.lab.image as image

    real_run = image.subprocess.run

    def only_apt_config(argv, *a, **k):
        assert argv[0] == "apt-config", f"a cached ensure_assets ran {argv}"
        return real_run(argv, *a, **k)

    monkeypatch.setattr(image.subprocess, "run", only_apt_config)
    again = ensure_assets()
    assert again == assets


def test_base_initramfs_holds_what_the_guest_needs(assets):
    names = set(cpio_list(assets.base_initramfs.read_bytes()))
    for name in ("init", "bin/busybox", "bin/sh", "usr/sbin/dropbear", "usr/bin/scp",
                 "usr/lib/openssh/sftp-server", "usr/lib/sftp-server", "etc/dropbear/host_key",
                 "etc/passwd", "etc/group", "etc/shadow", "etc/shells", "etc/nsswitch.conf",
                 "root/.ssh/authorized_keys", "etc/fleetbisect/init.d"):
        assert name in names, name
    modules = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("lib/modules/fleetbisect/"))
    assert "virtio_net.ko" in modules and "virtio-rng.ko" in modules and len(modules) == 10
    assert "virtio_console.ko" in modules  # the guest agent's virtio-serial port (lab/agent.py)
    assert any(re.fullmatch(r"lib(64)?/ld-linux-x86-64\.so\.2|lib/x86_64-linux-gnu/ld-linux-x86-64\.so\.2", n)
               for n in names), "the dynamic loader"


def test_the_agent_overlay_holds_qemu_ga_its_libraries_and_its_hook(assets):
    from fleetbisect.initramfs import shared_libs
    from fleetbisect.lab.agent import HOOK, ensure_agent_overlay, qemu_ga

    overlay = ensure_agent_overlay(assets)
    assert ensure_agent_overlay(assets) == overlay  # built once
    names = set(cpio_list(overlay.read_bytes()))
    assert "usr/sbin/qemu-ga" in names and "etc/fleetbisect/init.d/10-qemu-ga" in names
    for lib in shared_libs(qemu_ga()):
        assert str(lib).lstrip("/") in names, lib
    assert "-m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0" in HOOK


def test_missing_package_lists_are_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "lists" / "partial").mkdir(parents=True)
    conf = tmp_path / "apt.conf"
    conf.write_text(f'Dir::State::lists "{tmp_path / "lists"}/";\n')
    monkeypatch.setenv("APT_CONFIG", str(conf))  # apt as on a machine that never ran apt-get update
    with pytest.raises(InfraError, match="apt-get update"):
        ensure_assets(tmp_path / "cache")


@pytest.mark.timeout(240)
def test_two_processes_building_a_fresh_cache_at_once_share_one_build(tmp_path):
    code = ("import sys; from pathlib import Path; from fleetbisect.lab.image import ensure_assets; "
            "a = ensure_assets(Path(sys.argv[1])); print(a.dir, a.guest_host_key_pub)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=200) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert outs[0][0] == outs[1][0]  # same directory, same host key: one build, used twice
    built = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(built) == 1 and (built[0] / "complete").exists()  # no half-built leftovers


# --- (b) the generated repo ---------------------------------------------------------------------

def test_history_has_one_seeded_culprit(lab_repo):
    assert lab_repo.path.joinpath(".git").is_dir()
    assert git(lab_repo.path, "rev-list", "--reverse", "HEAD").split() == lab_repo.shas
    assert len(lab_repo.shas) == 24
    assert (lab_repo.good, lab_repo.bad, lab_repo.culprit) == (lab_repo.shas[0], lab_repo.shas[-1],
                                                                lab_repo.shas[CULPRIT])
    bodies = git(lab_repo.path, "log", "--format=%H%x00%B%x01").split("\x01")
    seeded = [b.split("\x00")[0].strip() for b in bodies if TRAILER in b.splitlines()]
    assert seeded == [lab_repo.shas[CULPRIT]]
    subject = git(lab_repo.path, "log", "-1", "--format=%s", lab_repo.culprit).strip()
    assert re.match(r"(net|virtio_net)\b.*: ", subject)


def test_seeded_commits_change_the_overlay_where_expected(lab_repo):
    def overlay(i: int) -> set[str]:
        return set(git(lab_repo.path, "ls-tree", "-r", "--name-only", lab_repo.shas[i], "overlay").split())

    hook, no_ssh = "overlay/etc/fleetbisect/init.d/50-netbudget", "overlay/etc/fleetbisect/no-ssh"
    assert [hook in overlay(i) for i in range(24)] == [i >= CULPRIT for i in range(24)]
    assert [no_ssh in overlay(i) for i in range(24)] == [i == NO_SSH for i in range(24)]
    mode = git(lab_repo.path, "ls-tree", lab_repo.shas[CULPRIT], hook).split()[0]
    assert mode == "100755"


def test_same_seed_same_repo(lab_repo, assets, tmp_path):
    again = generate_repo(tmp_path / "linux", assets, commits=24, seed=7, culprit=CULPRIT,
                          build_fails=[BUILD_FAILS], no_ssh=[NO_SSH])
    assert again.shas == lab_repo.shas


def test_default_choices_keep_skips_away_from_the_culprit(assets, tmp_path):
    repo = generate_repo(tmp_path / "linux", assets, commits=40, seed=3)
    culprit = repo.shas.index(repo.culprit)
    assert 0 < culprit < 39
    log = git(repo.path, "log", "--format=%H %s")
    skipped = [repo.shas.index(line.split()[0]) for line in log.splitlines()
               if "rework service startup" in line or "fix the build" in line]
    assert skipped and all(abs(i - culprit) > 1 for i in skipped)


def make(tree: Path, localversion: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LOCALVERSION=localversion)
    return subprocess.run(["sh", "-c", "make olddefconfig && make -j2"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


def test_make_produces_the_stamped_kernel_outputs(tree, lab_repo, assets):
    sha = lab_repo.shas[3]
    tree.checkout(sha)
    proc = make(tree.path, f"-fb{sha[:12]}")
    assert proc.returncode == 0, proc.stderr
    release = f"6.1.0-lab-fb{sha[:12]}"
    assert (tree.path / "include/config/kernel.release").read_text() == release + "\n"
    assert (tree.path / "arch/x86/boot/bzImage").read_bytes() == assets.kernel.read_bytes()
    img = (tree.path / "initramfs.img").read_bytes()
    base = assets.base_initramfs.read_bytes()
    assert img.startswith(base)
    overlay = gzip.decompress(img[len(base):])
    out = tree.path.parent / "overlay-x"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=overlay, cwd=out, check=True, capture_output=True)
    assert (out / "etc/fleetbisect/release").read_text() == release + "\n"
    assert git(tree.path, "status", "--porcelain") == ""  # build outputs are ignored


def test_build_fails_at_the_seeded_commit_and_the_next_one_fixes_it(tree, lab_repo):
    tree.checkout(lab_repo.shas[BUILD_FAILS])
    proc = make(tree.path, "-fbx")
    assert proc.returncode != 0
    assert re.search(r"\.[ch]:\d+:\d+: error: ", proc.stderr), proc.stderr
    tree.checkout(lab_repo.shas[BUILD_FAILS + 1])
    assert make(tree.path, "-fby").returncode == 0


# --- (c) booting a built initramfs --------------------------------------------------------------

@pytest.fixture(scope="module")
def build(lab_repo, tmp_path_factory):
    """build(i) -> (initramfs path, release) of commit i, built in a worktree of our own."""
    base = tmp_path_factory.mktemp("lab-image-builds")
    wt = base / "wt"
    git(lab_repo.path, "worktree", "add", "-q", "--detach", str(wt))

    def run(i: int) -> tuple[Path, str]:
        sha = lab_repo.shas[i]
        git(wt, "checkout", "-q", "--detach", sha)
        proc = make(wt, f"-fb{sha[:12]}")
        assert proc.returncode == 0, proc.stderr
        img = base / f"initramfs-{i}.img"
        img.write_bytes((wt / "initramfs.img").read_bytes())
        return img, (wt / "include/config/kernel.release").read_text().strip()

    try:
        yield run
    finally:
        subprocess.run(["git", "-C", str(lab_repo.path), "worktree", "remove", "--force", str(wt)], check=False)


@dataclass
class Guest:
    proc: subprocess.Popen
    console: Path
    port: int
    started: float

    def wait_ready(self, release: str, timeout: float = 60) -> float:
        """Seconds from QEMU's launch to the guest's ready marker for `release`."""
        want = f"FLEETBISECT-READY release={release} uname="
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.console.read_text(errors="replace") if self.console.exists() else ""
            if want in text:
                return time.monotonic() - self.started
            assert self.proc.poll() is None, f"QEMU exited ({self.proc.returncode}):\n{text[-2000:]}"
            time.sleep(0.02)
        raise AssertionError(f"no ready marker within {timeout}s:\n{text[-2000:]}")


@pytest.fixture
def boot(assets, tmp_path):
    """boot(initrd) -> a running Guest; every QEMU started is killed by its PID afterwards."""
    started: list[subprocess.Popen] = []

    def run(initrd: Path) -> Guest:
        port = free_port()
        console = tmp_path / f"console-{len(started)}.log"
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", "512", "-smp", "1",
                "-nographic", "-no-reboot", "-serial", f"file:{console}", "-monitor", "none",
                "-kernel", str(assets.kernel), "-initrd", str(initrd),
                "-append", "console=ttyS0 panic=-1",
                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
                "-device", "virtio-net-pci,netdev=n0,romfile=", "-device", "virtio-rng-pci"]
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        return Guest(proc, console, port, t0)

    try:
        yield run
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def connect(assets, port: int) -> paramiko.SSHClient:
    """Log in as the guest user, accepting only the host key baked into the image."""
    keytype, b64 = assets.guest_host_key_pub.split()[:2]
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.get_host_keys().add(f"[127.0.0.1]:{port}", keytype, paramiko.Ed25519Key(data=base64.b64decode(b64)))
    client.connect("127.0.0.1", port=port, username=assets.guest_user, key_filename=str(assets.guest_user_key),
                   look_for_keys=False, allow_agent=False, timeout=10, banner_timeout=10, auth_timeout=10)
    return client


def run(client: paramiko.SSHClient, command: str) -> str:
    _, out, _ = client.exec_command(command, timeout=10)
    text = out.read().decode()
    # not recv_exit_status(): it ignores timeouts
    assert out.channel.status_event.wait(10) and out.channel.exit_status == 0, command
    return text


def upload(client: paramiko.SSHClient, data: bytes, timeout: float) -> threading.Thread:
    """Start an SFTP upload in a daemon thread (so even a wedged one cannot hang the test)."""
    result: dict = {}

    def go() -> None:
        try:
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(timeout)
            sftp.putfo(io.BytesIO(data), "/tmp/blob", confirm=True)
            result["ok"] = True
        except Exception as e:  # noqa: BLE001 - the test inspects what happened
            result["error"] = e

    thread = threading.Thread(target=go, daemon=True)
    thread.result = result  # type: ignore[attr-defined]
    thread.start()
    return thread


@pytest.mark.timeout(180)
def test_built_guest_boots_and_takes_sftp_uploads(build, boot, assets, lab_repo):
    initrd, release = build(3)
    guest = boot(initrd)
    ready = guest.wait_ready(release)
    print(f"\nlaunch -> READY {ready:.2f}s; initramfs {initrd.stat().st_size} bytes "
          f"(base {assets.base_initramfs.stat().st_size})")
    client = connect(assets, guest.port)
    try:
        assert run(client, "cat /etc/fleetbisect/release").strip() == release
        assert run(client, "uname -r").strip() == assets.kernel_release
        data = os.urandom(UPLOAD)
        started = time.monotonic()
        t = upload(client, data, timeout=20)
        t.join(60)
        assert t.result.get("ok"), t.result  # type: ignore[attr-defined]
        print(f"SFTP 8 MiB in {time.monotonic() - started:.2f}s")
        assert run(client, "sha256sum /tmp/blob").split()[0] == hashlib.sha256(data).hexdigest()
    finally:
        client.close()


@pytest.mark.timeout(180)
def test_seeded_regression_stalls_an_upload_past_the_budget(build, boot, assets, lab_repo):
    initrd, release = build(CULPRIT)
    guest = boot(initrd)
    guest.wait_ready(release)
    client = connect(assets, guest.port)
    try:
        assert run(client, "cat /etc/fleetbisect/release").strip() == release  # small traffic: fine
        t = upload(client, os.urandom(UPLOAD), timeout=10)
        t.join(12)
        assert not t.result.get("ok"), "the upload finished, the regression did not trigger"  # type: ignore[attr-defined]
        err = t.result.get("error")  # type: ignore[attr-defined]
        assert err is None or isinstance(err, (TimeoutError, OSError, EOFError, paramiko.SSHException)), err
    finally:
        client.close()  # closing the transport also unblocks a thread still waiting on it
