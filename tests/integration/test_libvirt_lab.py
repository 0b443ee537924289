"""`kind: libvirt` against the real lab: virtlogd and libvirtd started by the fixture (no
systemd), domains of type qemu (TCG), `virsh` over the lab host's SSH connection.

Every domain is named fb-lab-<random> and destroyed/undefined in a finalizer; the daemons are
stopped by PID at the end of the session (when this session started them)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from fleetbisect.config.inventory import load_inventory
from fleetbisect.deadline import Deadline
from fleetbisect.lab.demo import write_lab_inventory
from fleetbisect.lab.libvirtd import LabDomain, LabLibvirt, lab_domain_xml, unique_name, virsh
from fleetbisect.lab.vmhost import free_port
from fleetbisect.stages.ready import wait_ready
from fleetbisect.targets import for_host
from fleetbisect.targets.base import TargetStartFailed

from .conftest import CULPRIT

FB = [sys.executable, "-m", "fleetbisect"]


@pytest.fixture(scope="session")
def libvirt_lab(tmp_path_factory):
    lab = LabLibvirt.start(tmp_path_factory.mktemp("libvirt"))
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture
def lab_domain(libvirt_lab, assets, tmp_path):
    """A domain the user already has (mode a): the lab kernel, port forwarded, shut off."""
    port = free_port()
    xml = lab_domain_xml(unique_name(), kernel=str(assets.kernel), initrd=str(assets.base_initramfs),
                         guest_port=port)
    with LabDomain.define(xml, tmp_path) as dom:
        dom.port = port
        yield dom


def libvirt_host(lab_host, assets, tmp_path, target: dict, guest_port: int | None = None):
    inv = write_lab_inventory(tmp_path / "inv.yaml", [lab_host], assets, target=target, guest_port=guest_port)
    return load_inventory([inv]).host(lab_host.name), inv


def playbook(cmdline="console=ttyS0 panic=-1"):
    return types.SimpleNamespace(boot=types.SimpleNamespace(cmdline=cmdline, memory=512, cpus=1), disk_image=None)


def boot_once(target, ssh, artifacts, step_dir: Path) -> str:
    """stop, deploy, start, log in, `uname -r`, stop, fetch the console: one step's target calls."""
    step_dir.mkdir(parents=True, exist_ok=True)
    target.stop(ssh, Deadline.after(60))
    target.deploy(ssh, artifacts, step_dir, Deadline.after(120))
    target.start(ssh, artifacts, step_dir, Deadline.after(120))
    try:
        guest, _ = wait_ready(lambda d: target.alive(ssh, d), lambda: target.probe(ssh),
                              lambda d: target.login(ssh, d), Deadline.after(120))
        with guest:
            return guest.run(["uname", "-r"], deadline=Deadline.after(30), check=True).stdout.strip()
    finally:
        target.stop(ssh, Deadline.after(60))
        target.fetch_console(ssh, step_dir / "console.log", Deadline.after(60))


def test_an_existing_domain_boots_the_step_kernel_and_comes_back_byte_for_byte(
    lab_domain, lab_host, assets, ssh, tmp_path
):
    host_cfg, _ = libvirt_host(lab_host, assets, tmp_path, {"kind": "libvirt", "domain": lab_domain.name},
                               lab_domain.port)
    # the user's VM runs when the run starts
    virsh("start", lab_domain.name)
    before = lab_domain.dumpxml()
    target = for_host(host_cfg, playbook("console=ttyS0 panic=-1 fb-step-marker"))
    artifacts = {"kernel": str(assets.kernel), "initrd": str(assets.base_initramfs)}
    release = boot_once(target, ssh, artifacts, tmp_path / "step")
    assert release == assets.kernel_release
    # it booted with this step's command line, and the console reached our file through virtlogd
    console = (tmp_path / "step" / "console.log").read_text(errors="replace")
    assert "fb-step-marker" in console and "FLEETBISECT-READY" in console
    during = lab_domain.dumpxml()
    assert during != before and "fb-step-marker" in during
    saved = Path(host_cfg.work_dir) / "libvirt" / f"{lab_domain.name}.orig.xml"
    assert saved.exists()

    done = target.restore(ssh, Deadline.after(120))
    assert "saved definition" in done and "started it again" in done
    assert lab_domain.dumpxml() == before  # byte for byte
    assert lab_domain.state() == "running"  # as the user had it
    assert not saved.exists()
    assert target.restore(ssh, Deadline.after(60)) == ""  # nothing left to restore


def test_a_second_run_or_a_resume_never_overwrites_the_saved_original(
    lab_domain, lab_host, assets, ssh, tmp_path
):
    host_cfg, _ = libvirt_host(lab_host, assets, tmp_path, {"kind": "libvirt", "domain": lab_domain.name},
                               lab_domain.port)
    before = lab_domain.dumpxml()
    first = for_host(host_cfg, playbook("first-run"))
    first.stop(ssh, Deadline.after(60))
    first.deploy(ssh, {"kernel": "/nonexistent/k1"}, tmp_path, Deadline.after(60))
    # the controller "dies" here: the domain is left pointing at k1. A new controller
    # (resume, or another run) deploys again, then restores.
    second = for_host(host_cfg, playbook("second-run"))
    second.stop(ssh, Deadline.after(60))
    second.deploy(ssh, {"kernel": "/nonexistent/k2"}, tmp_path, Deadline.after(60))
    assert "/nonexistent/k2" in lab_domain.dumpxml()
    second.restore(ssh, Deadline.after(60))
    assert lab_domain.dumpxml() == before
    assert lab_domain.state() == "shut off"  # it was off: it stays off


def test_virsh_start_errors_are_reported_with_their_text(lab_domain, lab_host, assets, ssh, tmp_path):
    host_cfg, _ = libvirt_host(lab_host, assets, tmp_path, {"kind": "libvirt", "domain": lab_domain.name},
                               lab_domain.port)
    target = for_host(host_cfg, playbook())
    try:
        target.deploy(ssh, {"kernel": str(tmp_path / "no-such-bzImage")}, tmp_path, Deadline.after(60))
        with pytest.raises(TargetStartFailed) as e:
            target.start(ssh, {}, tmp_path, Deadline.after(60))
        assert "no-such-bzImage" in str(e.value) and lab_domain.name in str(e.value)
    finally:
        target.restore(ssh, Deadline.after(60))


def test_a_domain_defined_from_the_builtin_template_is_undefined_at_the_end(
    libvirt_lab, lab_host, assets, ssh, tmp_path
):
    name = unique_name()
    host_cfg, _ = libvirt_host(lab_host, assets, tmp_path, {
        "kind": "libvirt", "domain": name, "template": "builtin"})
    target = for_host(host_cfg, playbook())
    try:
        release = boot_once(target, ssh, {"kernel": str(assets.kernel), "initrd": str(assets.base_initramfs)},
                            tmp_path / "step")
        assert release == assets.kernel_release
        assert virsh("domstate", name).stdout.strip() == "shut off"
        assert target.restore(ssh, Deadline.after(60)) == f"undefined domain {name}"
        assert virsh("domstate", name, check=False).returncode != 0  # gone
    finally:
        LabDomain(name).close()


def test_a_same_named_domain_that_is_not_ours_is_left_alone(lab_domain, lab_host, assets, ssh, tmp_path):
    host_cfg, _ = libvirt_host(lab_host, assets, tmp_path, {
        "kind": "libvirt", "domain": lab_domain.name, "template": "builtin"})
    before = lab_domain.dumpxml()
    target = for_host(host_cfg, playbook())
    with pytest.raises(TargetStartFailed, match="fleetbisect did not define it"):
        target.deploy(ssh, {"kernel": str(assets.kernel)}, tmp_path, Deadline.after(60))
    assert target.restore(ssh, Deadline.after(60)) == ""
    assert lab_domain.dumpxml() == before


def fleetbisect(*args, timeout=1200):
    return subprocess.run([*FB, *args], capture_output=True, text=True, timeout=timeout)


def test_check_probes_virsh_the_domain_and_the_emulator(lab_domain, lab_host, assets, tmp_path, playbook_variant):
    _, pb = playbook_variant()
    _, inv = libvirt_host(lab_host, assets, tmp_path, {"kind": "libvirt", "domain": lab_domain.name},
                          lab_domain.port)
    p = fleetbisect("check", "--host", lab_host.name, "--playbook", str(pb), "--inventory", str(inv))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    for probe in ("virsh", "libvirt domain", "emulator", "qemu-system-x86_64"):
        assert probe in out
    missing = tmp_path / "missing.yaml"
    missing.write_text(inv.read_text().replace(lab_domain.name, "fb-lab-no-such-domain"))
    p = fleetbisect("check", "--host", lab_host.name, "--playbook", str(pb), "--inventory", str(missing))
    assert p.returncode == 1
    assert "no domain fb-lab-no-such-domain" in p.stdout + p.stderr


def test_run_finds_the_culprit_through_libvirt_and_the_domain_comes_back(
    lab_repo, lab_domain, lab_host, assets, playbook_variant, ssh, tmp_path
):
    _, pb = playbook_variant({"reproducer": {"timeout": "6s"}})
    host_cfg, inv = libvirt_host(lab_host, assets, tmp_path, {"kind": "libvirt", "domain": lab_domain.name},
                                 lab_domain.port)
    before = lab_domain.dumpxml()
    run_dir = tmp_path / "run"
    p = fleetbisect("run", "--host", lab_host.name, "--playbook", str(pb), "--inventory", str(inv),
                    "--repo", str(lab_repo.path), "--good", lab_repo.good, "--bad", lab_repo.bad,
                    "--run-dir", str(run_dir))
    assert p.returncode == 0, p.stderr
    assert f"first bad commit: {lab_repo.shas[CULPRIT]}" in p.stdout
    assert lab_domain.dumpxml() == before
    assert f"restored {lab_host.name}: defined domain {lab_domain.name}" in p.stderr
    report = json.loads((run_dir / "report.json").read_text())
    steps = [s for s in report["steps"] if s["verdict"] in ("good", "bad")]
    for s in steps:  # the domain each step booted is kept beside its console
        assert (run_dir / Path(s["evidence"][0]).parent / "domain.xml").exists()
    print("libvirt per-step seconds:", [round(sum(s["durations"].values()), 1) for s in steps])

    # A controller that dies after the run's answer but before the restore: `resume` of the
    # finished run puts the domain back.
    target = for_host(host_cfg, playbook("left-behind"))
    target.stop(ssh, Deadline.after(60))
    target.deploy(ssh, {"kernel": "/nonexistent/left-behind"}, tmp_path, Deadline.after(60))
    assert lab_domain.dumpxml() != before
    p = fleetbisect("resume", str(run_dir))
    assert p.returncode == 0, p.stderr
    assert lab_domain.dumpxml() == before


def test_a_disk_image_converted_onto_the_domains_disk_is_its_root_and_the_domain_comes_back(
    lab_repo, lab_domain, lab_host, assets, tree, ssh, tmp_path
):
    """The field case's way (`demo --target libvirt --image`): the commit's guest built as a
    qcow2, pushed, converted to raw on the host, the domain's disk pointed at it; the guest's
    root is that disk; the user's domain is defined as it was afterwards."""
    import yaml

    from fleetbisect.config.playbook import load_playbook
    from fleetbisect.lab.demo import image_playbook, lab_playbook
    from fleetbisect.step import Lab, run_step
    from fleetbisect.ui import UI
    from fleetbisect.verdict import Verdict

    path = image_playbook(lab_playbook(), tmp_path / "image.yaml")
    data = yaml.safe_load(path.read_text())
    data["reproducer"] = {"kind": "command", "timeout": "30s",
                          "command": "grep -q '^/dev/vda / ext4 rw' /proc/mounts && cat /etc/fleetbisect/on-disk"}
    path.write_text(yaml.safe_dump(data))
    host_cfg, _ = libvirt_host(lab_host, assets, tmp_path, {"kind": "libvirt", "domain": lab_domain.name},
                               lab_domain.port)
    before = lab_domain.dumpxml()
    sha = lab_repo.shas[3]
    tree.checkout(sha)
    rec = run_step(Lab(tree.path, host_cfg, load_playbook(path), UI(quiet=True)), 1, sha, "s", tmp_path / "steps" / "a")
    assert rec.verdict is Verdict.GOOD, (rec.reason, rec.outcomes)
    assert rec.pushed["image"] > 0 and rec.release.endswith(f"-fb{sha[:12]}")
    assert f"file='{host_cfg.work_dir}/disk.raw'" in (tmp_path / "steps" / "a" / "domain.xml").read_text().replace('"', "'")
    assert "the guest's root is the disk image" in (tmp_path / "steps" / "a" / "reproducer.log").read_text()
    for_host(host_cfg, load_playbook(path)).restore(ssh, Deadline.after(120))
    assert lab_domain.dumpxml() == before
