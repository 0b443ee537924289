"""`kind: baremetal` against the lab's box: a libvirt domain with its own sshd and default
kernel, a real IPMI endpoint (virtualbmc, driven with ipmitool -I lanplus) and a real Redfish
one (sushy-tools' emulator, plain HTTP requests), both on 127.0.0.1 and both driving the box.
Only the box itself says which kernel it runs (/etc/fleetbisect/release over its SSH)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess

import pytest
import yaml

from fleetbisect.config.inventory import load_inventory
from fleetbisect.config.playbook import load_playbook
from fleetbisect.deadline import Deadline
from fleetbisect.lab.box import PASSWORD_ENV, LabBox, box_inventory, box_repo_assets, start_bmc
from fleetbisect.lab.demo import lab_playbook
from fleetbisect.lab.kernelrepo import generate_repo
from fleetbisect.lab.libvirtd import LabLibvirt
from fleetbisect.check import check_host
from fleetbisect.remote.ssh import SSHRemote
from fleetbisect.run import start_run
from fleetbisect.step import Lab, run_step
from fleetbisect.targets import for_host
from fleetbisect.ui import UI
from fleetbisect.verdict import OutcomeKind, Verdict

pytestmark = pytest.mark.lab
PASSWORD = secrets.token_urlsafe(12)


def test_the_lab_tools_are_installed():
    """.ci/setup installs them: a missing one fails here, it never skips a test."""
    for tool in ("ipmitool", "kexec"):
        assert shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin"), f"{tool} missing: run .ci/setup"


@pytest.fixture(scope="module")
def bmlab(assets, tmp_path_factory):
    base = tmp_path_factory.mktemp("bm")
    os.environ[PASSWORD_ENV] = PASSWORD
    lv = LabLibvirt.start(base / "libvirt")
    try:
        with LabBox.start(lv, assets, base / "box") as box:
            ipmi, ipmi_power = start_bmc("ipmi", base, box, PASSWORD)
            redfish, redfish_power = start_bmc("redfish", base, box, PASSWORD)
            with ipmi, redfish:
                yield {"base": base, "box": box, "ipmi": ipmi_power, "redfish": redfish_power}
    finally:
        lv.stop()


@pytest.fixture(scope="module")
def box_repo(assets, bmlab):
    return generate_repo(bmlab["base"] / "linux", box_repo_assets(assets, bmlab["base"]), commits=8, seed=3,
                         culprit=4, build_fails=[], no_ssh=[])


def inventory(bmlab, assets, tmp_path, power: str, **kw):
    path = box_inventory(tmp_path / "inventory.yaml", bmlab["box"], assets, bmlab[power], **kw)
    return path, load_inventory([path]).host("lab-box")


def playbook(tmp_path, changes: dict | None = None, scenario: str = "net-hang"):
    data = yaml.safe_load(lab_playbook(scenario).read_text())
    for section, fields in (changes or {}).items():
        data.setdefault(section, {}).update(fields)
    path = tmp_path / "playbook.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_playbook(path), path


def box_runs(host_cfg) -> str:
    """Which kernel the box runs, asked of the box itself."""
    with SSHRemote.connect(host_cfg.ssh_params(), deadline=Deadline.after(60)) as box:
        return box.run(["cat", "/etc/fleetbisect/release"], deadline=Deadline.after(30), check=True).stdout.strip()


def step(box_repo, host_cfg, pb, tmp_path, index: int, name: str):
    wt = tmp_path / f"wt-{name}"
    subprocess.run(["git", "-C", str(box_repo.path), "worktree", "add", "-q", "--detach", str(wt),
                    box_repo.shas[index]], check=True)
    lab = Lab(wt, host_cfg, pb, UI(quiet=True))
    return run_step(lab, 1, box_repo.shas[index], "subject", tmp_path / "steps" / name)


@pytest.mark.parametrize("power", ["ipmi", "redfish"])
def test_a_wrong_bmc_password_is_a_clear_error_at_check(bmlab, assets, tmp_path, power, monkeypatch, capsys):
    _, host_cfg = inventory(bmlab, assets, tmp_path, power)
    pb, _ = playbook(tmp_path)
    assert check_host(host_cfg, pb, UI(quiet=True)), "the right password passes check"
    monkeypatch.setenv(PASSWORD_ENV, "not-the-" + PASSWORD)
    capsys.readouterr()
    assert not check_host(host_cfg, pb, UI(quiet=True, json_events=True))
    out = capsys.readouterr()
    probes = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
    (power_probe,) = [p for p in probes if p.get("name") == "power"]
    assert power_probe["ok"] is False
    assert "refused the login" in power_probe["detail"] and PASSWORD_ENV in power_probe["detail"]
    assert "not-the-" + PASSWORD not in out.out + out.err  # never shown


@pytest.mark.slow  # a whole bisect: out of the default run, once in CI (.ci/run)
@pytest.mark.timeout(2400)  # ~6 steps of 1-2 min under TCG: each installs, boots and recovers a box
def test_bisect_of_the_box_kernel_finds_the_culprit_and_ends_on_the_known_good_kernel(
        bmlab, assets, box_repo, tmp_path):
    path, host_cfg = inventory(bmlab, assets, tmp_path, "ipmi")
    pb, pb_path = playbook(tmp_path, {"reproducer": {"timeout": "10s"}})
    report = start_run(repo=box_repo.path, good=box_repo.good, bad=box_repo.bad, host=host_cfg, inventory=[path],
                       playbook=pb, playbook_path=pb_path, run_dir=tmp_path / "run", ui=UI(quiet=True))
    assert report.status == "found", report.message
    assert report.culprit == box_repo.culprit
    # Each step ran its own build on the box, proven by the box itself.
    tested = [s for s in report.steps if s.verdict in (Verdict.GOOD, Verdict.BAD)]
    assert tested and all(s.release and s.release.endswith(f"-fb{s.commit[:12]}") for s in tested)
    # A bad kernel's network died: the box was brought back by its BMC, and it says so.
    bad = [s for s in report.steps if s.verdict is Verdict.BAD]
    recovered = [s for s in bad if (tmp_path / "run" / "steps").glob(f"*-{s.commit[:12]}/recovery.log")]
    logs = [p.read_text() for p in (tmp_path / "run" / "steps").glob("*/recovery.log")]
    assert recovered and any("recovered by IPMI BMC" in t for t in logs), logs
    assert any("NMI received" in p.read_text(errors="replace")
               for p in (tmp_path / "run" / "steps").glob("*/console.log"))
    # The run ends with the box on its known-good kernel.
    assert box_runs(host_cfg) == bmlab["box"].default_release


@pytest.mark.slow  # a whole bisect: out of the default run, once in CI (.ci/run)
@pytest.mark.timeout(1200)
def test_a_candidate_that_hangs_at_boot_is_power_cycled_and_the_next_step_goes_on(
        bmlab, assets, tmp_path):
    _, host_cfg = inventory(bmlab, assets, tmp_path, "redfish")
    repo = generate_repo(tmp_path / "linux", box_repo_assets(assets, bmlab["base"]), commits=8, seed=5,
                         culprit=4, build_fails=[], no_ssh=[], scenario="panic")
    # panic=0: the kernel that panics at boot then hangs there forever (a box that never comes back).
    # The playbook bisects a network hang, not a boot failure: a kernel that never boots is skip.
    pb, _ = playbook(tmp_path, {"boot": {"cmdline": "console=ttyS0 panic=0", "timeout": "40s"}})
    hung = step(repo, host_cfg, pb, tmp_path, 5, "hung")
    assert hung.verdict is Verdict.SKIP, hung.reason
    assert [o.kind for o in hung.outcomes] == [OutcomeKind.BOOT_FAILED]
    recovery = (tmp_path / "steps" / "hung" / "recovery.log").read_text()
    assert "NMI sent (Reset Nmi)" in recovery and "recovered by Redfish BMC" in recovery
    assert "Kernel panic" in (tmp_path / "steps" / "hung" / "console.log").read_text(errors="replace")
    assert box_runs(host_cfg) == bmlab["box"].default_release
    good = step(repo, host_cfg, pb, tmp_path, 2, "next")
    assert good.verdict is Verdict.GOOD, good.reason


def test_a_silent_fallback_to_the_default_kernel_is_a_skip_never_good(bmlab, assets, box_repo, tmp_path):
    # A one-shot that the box ignores (a boot loader that forgot the entry): it reboots into its default.
    _, host_cfg = inventory(bmlab, assets, tmp_path, "ipmi",
                            oneshot={"method": "command", "command": ["reboot", "-f"], "reboot": ["reboot", "-f"]})
    pb, _ = playbook(tmp_path)
    rec = step(box_repo, host_cfg, pb, tmp_path, 2, "fallback")
    assert rec.verdict is Verdict.SKIP, rec.reason
    (wrong,) = rec.outcomes
    assert wrong.kind is OutcomeKind.WRONG_KERNEL
    assert wrong.details["running"] == bmlab["box"].default_release
    assert wrong.details["expected"].endswith(f"-fb{box_repo.shas[2][:12]}")
    # restore() leaves the box on its known-good kernel with no test kernel left in /boot
    target = for_host(host_cfg, pb)
    with SSHRemote.connect(host_cfg.ssh_params(), deadline=Deadline.after(60)) as box:
        target.restore(box, Deadline.after(300))
    with SSHRemote.connect(host_cfg.ssh_params(), deadline=Deadline.after(60)) as box:
        left = box.run(["sh", "-c", "ls /boot"], deadline=Deadline.after(30)).stdout.split()
    assert not [f for f in left if f.startswith("vmlinuz-")], left
    assert box_runs(host_cfg) == bmlab["box"].default_release
