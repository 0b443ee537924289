"""Three VM hosts beside one host bisecting the same generated repo, in one benchmark run.

    .venv/bin/python bench/fleet.py [--commits 64] [--seed 11] [--rounds 1]

Three lab hosts (each its own loopback sshd, each starting its own QEMU) and one generated
kernel repo (the net-hang scenario). Each round bisects it once on one host (git's bisect, the
default) and once on all three (the kary search, asynchronous, cancelling what no longer
matters), alternating which goes first; both check the endpoints and confirm the culprit. It
prints each run's wall time, steps, median step time and wall time in median steps (the rounds,
when steps overlap), and the ratio three/one (target: <= 0.55).

Under TCG every QEMU needs a core: on a machine with fewer than four free cores, three guests
share them and each step gets slower, which the ratio shows honestly.
"""

from __future__ import annotations

import argparse
import os
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
from fleetbisect.lab.vmhost import LabHost  # noqa: E402
from fleetbisect.run import start_run  # noqa: E402
from fleetbisect.ui import UI  # noqa: E402


def bisect(base: Path, name: str, repo, hosts, assets) -> tuple[float, int, float]:
    inv = write_lab_inventory(base / f"{name}.yaml", hosts, assets)
    loaded = load_inventory([inv])
    cfgs = [loaded.host(h.name) for h in hosts]
    started = time.monotonic()
    report = start_run(repo=repo.path, good=repo.good, bad=repo.bad, host=cfgs[0], hosts=cfgs, inventory=[inv],
                       playbook=load_playbook(lab_playbook()), playbook_path=lab_playbook(),
                       run_dir=base / name, ui=UI(quiet=True))
    took = time.monotonic() - started
    assert report.culprit == repo.culprit and report.status == "found", f"{name}: {report.message}"
    step = statistics.median(sum(s.durations.values()) for s in report.steps)
    return took, len(report.steps), step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=64)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    assets = ensure_assets()
    times: dict[str, list[float]] = {"one": [], "three": []}
    with tempfile.TemporaryDirectory(prefix="fb-bench-fleet-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        repo = generate_repo(base / "linux", assets, commits=args.commits, seed=args.seed)
        hosts = [stack.enter_context(LabHost.start(base / f"host{i}", name=f"bench-host{i}")) for i in (1, 2, 3)]
        print(f"{args.commits} commits, culprit {repo.culprit[:12]}; {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f} at start")
        for r in range(args.rounds):
            order = [("one", hosts[:1]), ("three", hosts)]
            for name, fleet in (order if r % 2 == 0 else order[::-1]):
                took, steps, step = bisect(base, f"{name}-{r}", repo, fleet, assets)
                times[name].append(took)
                # wall / median step: how many steps' time the run took (rounds, when steps overlap)
                print(f"round {r + 1}: {name:5} host(s): {took:7.1f}s wall, {steps} steps, median step "
                      f"{step:.1f}s, wall = {took / step:.1f} median steps (load average {os.getloadavg()[0]:.1f})")
    one, three = statistics.median(times["one"]), statistics.median(times["three"])
    print(f"median wall time: one host {one:.1f}s, three hosts {three:.1f}s; ratio three/one = {three / one:.2f} "
          "(target <= 0.55)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
