"""`fleetbisect demo`: the embedded lab, end to end, with no hardware.

A real sshd on loopback plays the VM host, QEMU started by it over SSH boots the real Debian
cloud kernel with the lab's initramfs, and a generated kernel repo carries one seeded
regression (the guest's network dies after a few MB). The demo bisects it with the same code
path as `fleetbisect run` and checks the answer against the `Seeded-regression` trailer.
"""

from __future__ import annotations

import random
import shlex
import sys
from contextlib import ExitStack
from pathlib import Path

import yaml

from ..config.inventory import load_inventory
from ..config.playbook import load_playbook
from ..errors import UserError
from ..report import answer_line
from ..run import start_run
from ..ui import UI
from .vmhost import free_port

PLAYBOOKS = Path(__file__).parent / "playbooks"


def lab_playbook(scenario: str = "net-hang") -> Path:
    return PLAYBOOKS / f"{scenario}.yaml"


def write_lab_inventory(path: Path, hosts, assets, *, via: str = "direct", target: dict | None = None,
                        guest_port: int | None = None, slots: int = 1) -> Path:
    """An inventory for lab hosts (LabHost objects): the same file a user would write. `target`
    replaces the QEMU target's own fields (e.g. {"kind": "libvirt", "domain": "fb-lab-1234"});
    `guest_port` is the forwarded port, when a domain already forwards one; `slots`: VMs each
    host runs at once."""
    entries = {}
    for host in hosts:
        kind = dict(target) if target else {"kind": "qemu", "accel": "tcg"}
        entries[host.name] = {
            "ssh": {
                "address": "127.0.0.1",
                "port": host.port,
                "user": host.user,
                "key": str(host.user_key),
                "known_hosts": str(host.known_hosts),
                "connect_timeout": 10,
            },
            "work_dir": str(host.base_dir / "work"),
            **({"slots": slots} if slots > 1 else {}),
            "target": {
                **kind,
                "guest": {
                    "address": "127.0.0.1",
                    "port": guest_port or free_port(slots),
                    "via": via,
                    "user": assets.guest_user,
                    "key": str(assets.guest_user_key),
                    "host_key": str(assets.guest_host_key_pub_file),
                },
            },
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"hosts": entries}, sort_keys=False))
    return path


def fresh_demo(base: Path, seed: int | None) -> tuple[Path, int]:
    """A demo's directory (refused when it already holds a demo) and its repo's seed."""
    base = base.resolve()
    if (base / "linux").exists() or (base / "run").exists():
        raise UserError(f"{base} already holds a demo: pass a new --dir (or none for a fresh one)")
    return base, seed if seed is not None else random.randrange(1 << 30)


def demo(base: Path, ui: UI, *, commits: int = 210, seed: int | None = None, scenario: str = "net-hang",
         target: str = "qemu", image: bool = False, hosts: int = 1, real_kernel: bool = False,
         ahead: int = 0, slots: int = 1) -> int:
    """`target`: "qemu" (a QEMU the host starts per step) or "libvirt" (a domain the lab's
    libvirtd already has, booted with each step's kernel and put back exactly as it was).
    `image`: each commit's guest is built as a qcow2 disk image that the host converts onto
    the VM's disk (the field case's NixOS image), beside the kernel it boots directly.
    `hosts`: that many VM hosts (each its own sshd and QEMU), bisecting together (kary search;
    bayes for the flaky scenario). `slots`: VMs each host runs at once (inventory `slots:`)."""
    from .image import ensure_assets
    from .kernelrepo import generate_repo
    from .vmhost import LabHost

    if slots > 1 and (real_kernel or target != "qemu"):
        raise UserError("--slots: several VMs per host are QEMUs the host starts (--target qemu)")
    if real_kernel:  # a real kernel built from Debian's linux-source (lab/realkernel.py)
        if hosts > 1 or target != "qemu" or image:
            raise UserError("--real-kernel runs on one QEMU host (no --hosts, --target or --image with it)")
        from . import realkernel

        return realkernel.demo(base, ui, ahead=ahead)
    if target == "baremetal":  # the box's own kernel is bisected: no VM host
        if hosts > 1 or image:
            raise UserError("--target baremetal bisects one box's own kernel (no --hosts or --image with it)")
        from .boxdemo import box_demo

        return box_demo(base, ui, commits=commits, seed=seed, scenario=scenario)
    base, seed = fresh_demo(base, seed)
    ui.step("lab: preparing the guest kernel and initramfs (cached after the first time)")
    assets = ensure_assets()
    ui.step(f"lab: generating a kernel repo of {commits} commits (scenario {scenario}, seed {seed})")
    repo = generate_repo(base / "linux", assets, commits=commits, seed=seed, scenario=scenario)
    if hosts > 1 and target != "qemu":
        raise UserError("--hosts: the lab's extra VM hosts run QEMU (--target qemu)")
    with LabHost.start(base / "host", name="lab-host") as host, ExitStack() as stack:
        ui.step(f"lab: VM host lab-host is sshd on 127.0.0.1:{host.port}")
        fleet = [host] + [stack.enter_context(LabHost.start(base / f"host{i}", name=f"lab-host{i}"))
                          for i in range(2, hosts + 1)]
        for extra in fleet[1:]:
            ui.step(f"lab: VM host {extra.name} is sshd on 127.0.0.1:{extra.port}")
        domain = None
        if target == "libvirt":
            domain, extra = _libvirt_domain(base, assets, ui, stack)
            inventory = write_lab_inventory(base / "inventory.yaml", [host], assets, **extra)
            before = domain.dumpxml()
        else:
            inventory = write_lab_inventory(base / "inventory.yaml", fleet, assets, slots=slots)
        playbook_path = lab_playbook(scenario)
        if image:
            playbook_path = image_playbook(playbook_path, base / "playbook-image.yaml")
        loaded = load_inventory([inventory])
        host_cfgs = [slot for h in fleet for slot in loaded.host(h.name).slot_hosts()]
        playbook = load_playbook(playbook_path)
        report = start_run(
            repo=repo.path, good=repo.good, bad=repo.bad, host=host_cfgs[0], hosts=host_cfgs,
            inventory=[inventory], playbook=playbook, playbook_path=playbook_path, run_dir=base / "run", ui=ui,
        )
        restored = domain is None or domain.dumpxml() == before
        if not restored:
            ui.error(f"the domain {domain.name} is not defined as it was before the run")
        elif domain is not None:
            ui.good(f"the domain {domain.name} is defined exactly as it was before the run")
    seeded = repo.culprit
    found = report.culprit == seeded and report.status == "found"
    if found:
        ui.good(
            f"found the seeded regression in {len(report.steps)} steps: "
            f"{report.culprit[:12]} {report.culprit_subject}"
        )
        if report.search_answer and report.calibration:
            ans, cal = report.search_answer, report.calibration
            ui.good(f"confidence {ans['confidence']:.4f} after {ans['runs']} runs; the bad end failed "
                    f"{cal['failures']}/{cal['runs']} boots (hit rate {cal['hit_rate']:.2f}, "
                    f"{cal['level']:.0%} interval {cal['low']:.2f}-{cal['high']:.2f})"
                    + (f"; runner-up {ans['runner_up'][:12]}" if ans.get("runner_up") else ""))
    else:
        ui.error(f"expected the seeded regression {seeded[:12]}, the run says: {report.message}")
    print(f"run directory: {report.run_dir}")
    print(answer_line(report.status, report.culprit, report.culprit_subject, report.message))
    return 0 if found and restored else 1


def image_playbook(source: Path, dest: Path) -> Path:
    """The lab playbook `source` with the guest built as a disk image: the build also packs the
    commit's guest into an ext4 qcow2 (fleetbisect.lab.diskimage) and a boot initramfs that
    mounts it as the root; the host converts it to raw onto the VM's disk each step."""
    data = yaml.safe_load(source.read_text())
    pack = shlex.join([sys.executable, "-m", "fleetbisect.lab.diskimage", "initramfs.img", "disk.qcow2",
                       "boot-initrd.img"])
    data["name"] = f"{data.get('name', source.stem)}-image"
    data["build"]["command"] = f"{data['build']['command']} && {pack}"
    data["artifacts"] = {"kernel": "arch/x86/boot/bzImage", "initrd": "boot-initrd.img", "image": "disk.qcow2"}
    data["image"] = {"format": "raw", "size": "128M"}
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def _libvirt_domain(base: Path, assets, ui: UI, stack: ExitStack):
    """Start the lab's libvirt and define the domain a user would already have; both go away
    when `stack` closes. Returns the domain and write_lab_inventory's extra arguments."""
    from .libvirtd import LabDomain, LabLibvirt, lab_domain_xml, unique_name

    ui.step("lab: starting virtlogd and libvirtd (the first virsh call takes ~12 s)")
    lab = stack.enter_context(LabLibvirt.start(base / "libvirt"))
    port = free_port()
    xml = lab_domain_xml(unique_name("fb-demo"), kernel=str(assets.kernel), initrd=str(assets.base_initramfs),
                         guest_port=port)
    domain = stack.enter_context(LabDomain.define(xml, lab.base_dir))
    ui.step(f"lab: libvirt domain {domain.name} forwards 127.0.0.1:{port} to its guest's sshd")
    return domain, {"target": {"kind": "libvirt", "domain": domain.name}, "guest_port": port}
