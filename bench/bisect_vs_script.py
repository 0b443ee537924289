"""fleetbisect against the shell script it replaces, on the lab's generated kernel repo.

    .venv/bin/python bench/bisect_vs_script.py [--commits 300] [--size 16M] [--stall 3]

The same repo (one seeded net-hang regression, an unbuildable stretch) is bisected twice in
one benchmark run, with the same work per step:

1. the field script: `git bisect run` of a hand-written shell script that does what the
   field case's did: `make`, boot QEMU (user networking, the guest's sshd forwarded), poll
   `ssh true` with `sleep 1` until the guest answers, `for i in 1 2 3; do timeout 20 scp …;
   done`, kill QEMU; exit 1 when a copy fails, 125 when the build does.
2. `fleetbisect run` against a lab VM host (a real sshd on loopback that starts QEMU), the
   lab playbook with the same reproducer (3 copies of --size, each under 20 s) plus
   `stall:`, endpoint checks and the culprit's confirmation ON (the defaults).

fleetbisect runs once per `--slots` value (default 1 and 2): with 1 the host runs one VM at a
time, as the script does (git's bisect); with 2 the same host runs two VMs side by side
(`slots: 2` in the inventory): the endpoint checks run together, the search tests two commits
per round (kary), the confirmation's two retests run together.

Prints every wall time, steps and culprits, the ratios (target <= 0.7), and per-stage medians
over fleetbisect's steps from its report.json and journal, with the controller's own overhead
per step: step wall minus build, launch-to-answer (ready) and the reproducer (target <= 0.5 s).
Numbers under TCG on a machine shared with other work: the ratio is what compares.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetbisect.lab.demo import lab_playbook, write_lab_inventory  # noqa: E402
from fleetbisect.lab.image import ensure_assets  # noqa: E402
from fleetbisect.lab.kernelrepo import generate_repo  # noqa: E402
from fleetbisect.lab.vmhost import LabHost, free_port  # noqa: E402
from fleetbisect.reproducers.transfer import stress_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""#!/bin/sh
# The field script, as a user writes it for `git bisect run`.
echo step >> "$BENCH/steps"
make olddefconfig >/dev/null 2>&1 && make -j2 > "$BENCH/build.log" 2>&1 || exit 125
qemu-system-x86_64 -machine q35 -accel tcg -m 512 -smp 1 -display none -no-reboot \
  -serial file:"$BENCH/console.log" -monitor none \
  -kernel arch/x86/boot/bzImage -initrd initramfs.img -append "console=ttyS0 panic=-1" \
  -netdev user,id=n0,hostfwd=tcp:127.0.0.1:$PORT-:22 -device virtio-net-pci,netdev=n0,romfile= \
  -device virtio-rng-pci -daemonize -pidfile "$BENCH/qemu.pid" || exit 125
SSH="-o BatchMode=yes -o UserKnownHostsFile=$BENCH/known_hosts -o StrictHostKeyChecking=yes -o ConnectTimeout=1 -i $KEY"
stop() { kill "$(cat "$BENCH/qemu.pid")"; while [ -e "$BENCH/qemu.pid" ]; do sleep 0.1; done; }
n=0
until ssh $SSH -p "$PORT" "$GUEST_USER@127.0.0.1" true 2>/dev/null; do
  n=$((n + 1)); [ "$n" -gt 60 ] && { stop; exit 125; }
  sleep 1
done
rc=0
for i in 1 2 3; do
  timeout 20 scp -O -q $SSH -P "$PORT" "$FILE" "$GUEST_USER@127.0.0.1:/tmp/stress.bin" || { rc=1; break; }
done
stop
exit $rc
"""


def git(repo: Path, *args: str, **kw) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          **kw).stdout


def by_script(repo, assets, size: int, tmp: Path) -> dict:
    wt, bench = tmp / "script-tree", tmp / "script"
    bench.mkdir()
    git(repo.path, "worktree", "add", "-q", "--detach", str(wt), repo.bad)
    script = bench / "field-script.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    port = free_port()
    (bench / "known_hosts").write_text(f"[127.0.0.1]:{port} {assets.guest_host_key_pub}\n")
    env = {**os.environ, "BENCH": str(bench), "PORT": str(port), "KEY": str(assets.guest_user_key),
           "GUEST_USER": assets.guest_user, "FILE": str(stress_file(size))}
    started = time.monotonic()
    try:
        git(wt, "bisect", "start", repo.bad, repo.good)
        out = git(wt, "bisect", "run", str(script), env=env)
    finally:
        pid = bench / "qemu.pid"
        if pid.exists():  # the QEMU this script started and did not stop (an interrupted run)
            os.kill(int(pid.read_text()), 15)
    wall = time.monotonic() - started
    culprit = next((line.split()[0] for line in out.splitlines() if "is the first bad commit" in line), None)
    git(wt, "bisect", "reset")
    git(repo.path, "worktree", "remove", "--force", str(wt))
    return {"wall": wall, "steps": len((bench / "steps").read_text().split()), "culprit": culprit}


def by_fleetbisect(repo, assets, size: int, stall: float, tmp: Path, slots: int = 1) -> dict:
    tmp = tmp / f"fb-slots-{slots}"
    tmp.mkdir(parents=True)
    with LabHost.start(tmp / "host", name="bench-host") as lab:
        inv = write_lab_inventory(tmp / "inv.yaml", [lab], assets, slots=slots)
        data = yaml.safe_load(lab_playbook().read_text())
        data["reproducer"].update({"size": size, "iterations": 3, "timeout": "20s", "stall": f"{stall}s"})
        playbook = tmp / "playbook.yaml"
        playbook.write_text(yaml.safe_dump(data, sort_keys=False))
        run_dir = tmp / "run"
        argv = [str(ROOT / ".venv/bin/fleetbisect"), "run", "--inventory", str(inv), "--host", lab.name,
                "--playbook", str(playbook), "--repo", str(repo.path), "--good", repo.good, "--bad", repo.bad,
                "--run-dir", str(run_dir)]
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True)
        wall = time.monotonic() - started
    report = json.loads((run_dir / "report.json").read_text())
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
    events = [json.loads(x) for x in (run_dir / "journal.jsonl").read_text().splitlines()]
    began = {e["index"]: e["time"] for e in events if e["event"] == "step-started"}
    walls = {e["record"]["index"]: e["time"] - began[e["record"]["index"]]
             for e in events if e["event"] == "step-finished" and e["record"]["index"] in began}
    return {"wall": wall, "steps": len(report["steps"]), "culprit": report["culprit"], "status": report["status"],
            "search": next((e["config"].get("search", "bisect") for e in events if e["event"] == "run-started"),
                           "?"),
            "report": report, "step_walls": walls, "cmd": shlex.join(argv)}


def stage_table(fb: dict) -> list[str]:
    steps = fb["report"]["steps"]
    stages = ["build", "push", "boot", "ready", "reproduce", "cleanup"]
    lines = [f"{'stage':<12}{'median s':>10}{'steps':>7}"]
    for stage in stages:
        xs = [s["durations"][stage] for s in steps if stage in s["durations"]]
        if xs:
            lines.append(f"{stage:<12}{statistics.median(xs):>10.2f}{len(xs):>7}")
    overhead = []
    for s in steps:
        wall = fb["step_walls"].get(s["index"])
        if wall is None or "reproduce" not in s["durations"]:
            continue
        d = s["durations"]
        overhead.append(wall - d.get("build", 0) - d.get("ready", 0) - d.get("reproduce", 0))
    walls = list(fb["step_walls"].values())
    lines.append(f"{'step wall':<12}{statistics.median(walls):>10.2f}{len(walls):>7}")
    if overhead:
        lines.append(f"{'overhead':<12}{statistics.median(overhead):>10.2f}{len(overhead):>7}"
                     "   (step wall - build - ready - reproduce; target <= 0.5)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commits", type=int, default=300)
    ap.add_argument("--size", default="16M")
    ap.add_argument("--stall", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2],
                    help="fleetbisect runs, one per value: VMs the one host runs at once (default: 1 2)")
    args = ap.parse_args()
    from fleetbisect.config.loader import parse_bytes

    size = parse_bytes(args.size)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    assets = ensure_assets()
    stress_file(size)
    with tempfile.TemporaryDirectory(prefix="fb-bench-bisect-") as tmp:
        tmp = Path(tmp)
        culprit = args.commits * 6 // 10
        repo = generate_repo(tmp / "linux", assets, commits=args.commits, seed=args.seed, culprit=culprit,
                             build_fails=list(range(culprit // 2, culprit // 2 + 3)), no_ssh=[])
        script = by_script(repo, assets, size, tmp)
        fbs = {n: by_fleetbisect(repo, assets, size, args.stall, tmp, n) for n in args.slots}
    print(f"lab repo: {args.commits} commits, culprit {repo.culprit[:12]}, 3 x {args.size} per step, "
          f"scp timeout 20 s, stall {args.stall:g} s (machine shared with other work)")
    print(f"{'':<30}{'wall s':>9}{'steps':>7}  culprit")
    print(f"{'git bisect run script':<30}{script['wall']:>9.1f}{script['steps']:>7}  {(script['culprit'] or '-')[:12]}")
    for n, fb in fbs.items():
        label = "fleetbisect run" + (f", {n} slots" if n > 1 else "")
        print(f"{label:<30}{fb['wall']:>9.1f}{fb['steps']:>7}  {(fb['culprit'] or '-')[:12]} "
              f"({fb['status']}, {fb['search']}; endpoint checks and confirmation on)")
    for n, fb in fbs.items():
        print(f"ratio fleetbisect/script, {n} slot(s): {fb['wall'] / script['wall']:.2f} (target <= 0.7)")
    for n, fb in fbs.items():
        print(f"\nfleetbisect, {n} slot(s):")
        print("\n".join(stage_table(fb)))
    found = all(fb["culprit"] == repo.culprit for fb in fbs.values())
    return 0 if script["culprit"] == repo.culprit and found else 1


if __name__ == "__main__":
    sys.exit(main())
