"""Per-step time of `kind: libvirt` beside `kind: qemu`, on the same lab, in the same session.

    .venv/bin/python bench/libvirt_step.py [--commits 16] [--rounds 1]

One lab host, one generated kernel repo (the net-hang scenario) and the lab's libvirt with a
domain like a user's. Each round bisects the repo once with a QEMU the host starts per step and
once through the libvirt domain (direct kernel boot), alternating which goes first. Per stage
(boot = stop + deploy + start, ready, reproduce, cleanup) the median over the tested steps
(good or bad) of each target is printed from report.json, with libvirt/qemu ratios. The lab's
libvirtd start (the QEMU capability probe) is timed apart: it is paid once per host, not per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetbisect.config.inventory import load_inventory  # noqa: E402
from fleetbisect.config.playbook import load_playbook  # noqa: E402
from fleetbisect.lab.demo import lab_playbook, write_lab_inventory  # noqa: E402
from fleetbisect.lab.image import ensure_assets  # noqa: E402
from fleetbisect.lab.kernelrepo import generate_repo  # noqa: E402
from fleetbisect.lab.libvirtd import LabDomain, LabLibvirt, lab_domain_xml, unique_name  # noqa: E402
from fleetbisect.lab.vmhost import LabHost, free_port  # noqa: E402
from fleetbisect.run import start_run  # noqa: E402
from fleetbisect.ui import UI  # noqa: E402

STAGES = ("build", "push", "boot", "ready", "reproduce", "cleanup")


def bisect(base: Path, name: str, repo, host, assets, target: dict | None, port: int | None) -> list[dict]:
    inv = write_lab_inventory(base / f"{name}.yaml", [host], assets, target=target, guest_port=port)
    report = start_run(repo=repo.path, good=repo.good, bad=repo.bad, host=load_inventory([inv]).host(host.name),
                       inventory=[inv], playbook=load_playbook(lab_playbook()), playbook_path=lab_playbook(),
                       run_dir=base / name, ui=UI(quiet=True))
    assert report.culprit == repo.culprit, f"{name}: {report.message}"
    data = json.loads((base / name / "report.json").read_text())
    return [s["durations"] for s in data["steps"] if s["verdict"] in ("good", "bad")]


def median(steps: list[dict], stage: str | None) -> float:
    return statistics.median(sum(s.values()) if stage is None else s.get(stage, 0.0) for s in steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    assets = ensure_assets()
    steps: dict[str, list[dict]] = {"qemu": [], "libvirt": []}
    with tempfile.TemporaryDirectory(prefix="fb-bench-libvirt-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        repo = generate_repo(base / "linux", assets, commits=args.commits, seed=11)
        host = stack.enter_context(LabHost.start(base / "host"))
        t = time.monotonic()
        lab = stack.enter_context(LabLibvirt.start(base / "libvirt"))
        started = time.monotonic() - t
        port = free_port()
        dom = stack.enter_context(LabDomain.define(lab_domain_xml(
            unique_name("fb-bench"), kernel=str(assets.kernel), initrd=str(assets.base_initramfs),
            guest_port=port), lab.base_dir))
        for r in range(args.rounds):
            order = ("qemu", "libvirt") if r % 2 == 0 else ("libvirt", "qemu")
            for kind in order:
                target = {"kind": "libvirt", "domain": dom.name} if kind == "libvirt" else None
                steps[kind] += bisect(base, f"{kind}-{r}", repo, host, assets, target,
                                      port if kind == "libvirt" else None)
    print(f"libvirtd start (first virsh call): {started:.1f} s {'(started here)' if lab.started_here else '(reused)'}")
    print(f"tested steps: qemu {len(steps['qemu'])}, libvirt {len(steps['libvirt'])}")
    print(f"{'stage':<10} {'qemu s':>8} {'libvirt s':>10} {'ratio':>6}")
    for stage in (*STAGES, None):
        q, lv = median(steps["qemu"], stage), median(steps["libvirt"], stage)
        ratio = f"{lv / q:.2f}" if q > 0 else "-"
        print(f"{stage or 'step':<10} {q:>8.2f} {lv:>10.2f} {ratio:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
