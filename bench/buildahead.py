"""Build-ahead on the real-kernel lab: the same bisect without and with it, in one run.

    .venv/bin/python bench/buildahead.py [--ahead 1] [--order on,off] [--no-warm-up]

One lab host, the real-kernel lab repository (Debian's linux-source-6.1 with its seeded
virtio-net regression, lab/realkernel.py) and its playbook. First a warm-up builds the good and
the bad ends once in a scratch worktree, so that ccache is as warm for both bisects (a fresh run
still builds its first commit in full: ccache turns that into hits). Then the same bisect runs
with `build.ahead: 0` and with `build.ahead: N`, each in a run directory and a clone of its own
(its own build cache).

Printed per bisect, from report.json: wall time, steps, the time the host waited for builds (the
build stage of every step: from the step's start until its artifacts are there, which includes
waiting for a build ahead still under way), its share of the wall time, and the ratios of the
bisect with build-ahead to the one without.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetbisect.config.inventory import load_inventory  # noqa: E402
from fleetbisect.config.playbook import load_playbook  # noqa: E402
from fleetbisect.deadline import Deadline  # noqa: E402
from fleetbisect.lab.demo import write_lab_inventory  # noqa: E402
from fleetbisect.lab.image import ensure_assets  # noqa: E402
from fleetbisect.lab.realkernel import clone, ensure_real_repo, guest_initramfs, write_playbook  # noqa: E402
from fleetbisect.lab.vmhost import LabHost  # noqa: E402
from fleetbisect.run import start_run  # noqa: E402
from fleetbisect.stages.build import build  # noqa: E402
from fleetbisect.ui import UI  # noqa: E402


def warm_up(base: Path, repo, playbook) -> float:
    started = time.monotonic()
    src = clone(repo, base / "warm-repo")
    tree = base / "warm"
    subprocess.run(["git", "-C", str(src), "worktree", "add", "-q", "--detach", str(tree), repo.good], check=True)
    for commit in (repo.good, repo.bad):
        subprocess.run(["git", "-C", str(tree), "checkout", "-q", "--detach", commit], check=True)
        res = build(tree, playbook, commit, base / "warm-logs" / f"{commit[:12]}.log", Deadline.after(3600))
        assert res.ok, f"warm-up build of {commit[:12]} failed: {res.summary} ({res.log})"
    subprocess.run(["git", "-C", str(src), "worktree", "remove", "--force", str(tree)], check=True)
    return time.monotonic() - started


def bisect(base: Path, name: str, repo, host, assets, initramfs: Path, ahead: int) -> dict:
    src = clone(repo, base / f"{name}-repo")
    pb_path = write_playbook(base / f"{name}.yaml", repo, initramfs, ahead=ahead)
    inv = write_lab_inventory(base / f"{name}-inventory.yaml", [host], assets)
    started = time.monotonic()
    report = start_run(repo=src, good=repo.good, bad=repo.bad, host=load_inventory([inv]).host(host.name),
                       inventory=[inv], playbook=load_playbook(pb_path), playbook_path=pb_path,
                       run_dir=base / name, ui=UI(quiet=True))
    wall = time.monotonic() - started
    assert report.culprit == repo.culprit, f"{name}: {report.message}"
    steps = json.loads((base / name / "report.json").read_text())["steps"]
    waited = sum(s["durations"].get("build", 0.0) for s in steps)
    return {"wall": wall, "steps": len(steps), "waited": waited, "share": waited / wall,
            "per_step": [round(s["durations"].get("build", 0.0), 1) for s in steps]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ahead", type=int, default=1, help="build.ahead of the bisect with build-ahead")
    ap.add_argument("--order", default="on,off", help="which bisect runs first (on,off: a ccache the first "
                    "bisect warms helps the one without build-ahead)")
    ap.add_argument("--no-warm-up", action="store_true", help="ccache is known warm for both ends already")
    args = ap.parse_args()
    assets = ensure_assets()
    t = time.monotonic()
    repo = ensure_real_repo()
    print(f"real-kernel lab repository: {repo.path} ({len(repo.shas)} commits, {time.monotonic() - t:.0f}s)")
    with tempfile.TemporaryDirectory(prefix="fb-bench-ahead-") as tmp:
        base = Path(tmp)
        initramfs = guest_initramfs(assets, base / "initramfs.img")
        pb = load_playbook(write_playbook(base / "warm.yaml", repo, initramfs))
        if not args.no_warm_up:
            print(f"warm-up (ccache): the good and bad ends built in {warm_up(base, repo, pb):.0f}s")
        results = {}
        with LabHost.start(base / "host", name="lab-host") as host:
            for name in args.order.split(","):
                results[name] = bisect(base, name, repo, host, assets, initramfs, args.ahead if name == "on" else 0)
                r = results[name]
                print(f"build-ahead {name:3}: wall {r['wall']:6.1f}s  steps {r['steps']:2}  waited for builds "
                      f"{r['waited']:6.1f}s ({r['share']:.0%} of wall)  per step {r['per_step']}")
    off, on = results["off"], results["on"]
    print(f"with/without build-ahead: wall x{on['wall'] / off['wall']:.2f}, "
          f"waited for builds x{on['waited'] / off['waited']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
