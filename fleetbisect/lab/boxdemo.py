"""`fleetbisect demo --target baremetal`: bisect the kernel of the lab's bare-metal box.

The box is a libvirt domain with its own sshd and known-good default kernel; its BMC is
virtualbmc (IPMI over lanplus on 127.0.0.1). Each step installs a candidate on the box, boots
it once with kexec, checks the box runs it, runs the reproducer on the box; a bad kernel's
network dies, so the box is brought back by NMI + power cycle through the BMC. At the end the
box must be back on its known-good kernel, asked of the box itself.
"""

from __future__ import annotations

import os
import secrets
from contextlib import ExitStack
from pathlib import Path

from ..config.inventory import load_inventory
from ..config.playbook import load_playbook
from ..deadline import Deadline
from ..errors import UserError
from ..remote.ssh import SSHRemote
from ..report import answer_line
from ..run import start_run
from ..ui import UI
from .box import PASSWORD_ENV, LabBox, box_inventory, box_repo_assets, start_bmc
from .demo import fresh_demo

STAGES = ("build", "push", "boot", "ready", "reproduce", "cleanup")


def stage_table(steps) -> str:
    """A step's time by stage: the mean over the steps that ran each stage, in seconds."""
    parts = []
    for stage in STAGES:
        times = [s.durations[stage] for s in steps if stage in s.durations]
        if times:
            parts.append(f"{stage} {sum(times) / len(times):.1f}s")
    return ", ".join(parts)


def box_demo(base: Path, ui: UI, *, commits: int, seed: int | None, scenario: str, power: str = "ipmi") -> int:
    from .demo import lab_playbook
    from .image import ensure_assets
    from .kernelrepo import generate_repo
    from .libvirtd import LabLibvirt

    if scenario != "net-hang":
        raise UserError("the bare-metal demo bisects the net-hang scenario (its reproducer runs on the box)")
    base, seed = fresh_demo(base, seed)
    ui.step("lab: preparing the box's kernel and initramfs (cached after the first time)")
    assets = ensure_assets()
    ui.step(f"lab: generating a kernel repo of {commits} commits (scenario {scenario}, seed {seed})")
    repo = generate_repo(base / "linux", box_repo_assets(assets, base), commits=commits, seed=seed, scenario=scenario)
    os.environ[PASSWORD_ENV] = secrets.token_urlsafe(12)  # 16 chars: IPMI 2.0 takes at most 20 bytes
    with ExitStack() as stack:
        ui.step("lab: starting virtlogd and libvirtd (the first virsh call takes ~12 s)")
        lv = stack.enter_context(LabLibvirt.start(base / "libvirt"))
        box = stack.enter_context(LabBox.start(lv, assets, base / "box"))
        ui.step(f"lab: box {box.name} runs its default kernel, sshd on 127.0.0.1:{box.ssh_port}")
        bmc, power_block = start_bmc(power, base, box, os.environ[PASSWORD_ENV])
        stack.enter_context(bmc)
        ui.step(f"lab: its BMC ({power}) listens on 127.0.0.1:{bmc.port}")
        inventory = box_inventory(base / "inventory.yaml", box, assets, power_block)
        host_cfg = load_inventory([inventory]).host("lab-box")
        playbook_path = lab_playbook(scenario)
        report = start_run(repo=repo.path, good=repo.good, bad=repo.bad, host=host_cfg, inventory=[inventory],
                           playbook=load_playbook(playbook_path), playbook_path=playbook_path,
                           run_dir=base / "run", ui=ui)
        with SSHRemote.connect(host_cfg.ssh_params(), deadline=Deadline.after(120)) as ssh:
            running = ssh.run(["cat", "/etc/fleetbisect/release"], deadline=Deadline.after(30)).stdout.strip()
    restored = running == box.default_release
    if restored:
        ui.good(f"the box is back on its known-good kernel {running}")
    else:
        ui.error(f"the box runs {running!r} after the run, not its known-good {box.default_release}")
    found = report.culprit == repo.culprit and report.status == "found"
    if found:
        ui.good(f"found the seeded regression in {len(report.steps)} steps: "
                f"{report.culprit[:12]} {report.culprit_subject}")
    else:
        ui.error(f"expected the seeded regression {repo.culprit[:12]}, the run says: {report.message}")
    ui.info(f"a step's time by stage (mean): {stage_table(report.steps)}")
    print(f"run directory: {report.run_dir}")
    print(answer_line(report.status, report.culprit, report.culprit_subject, report.message))
    return 0 if found and restored else 1
