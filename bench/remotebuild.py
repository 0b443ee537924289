"""What building on a build host costs per step, against building here, on the lab repo.

    .venv/bin/python bench/remotebuild.py [--steps 6] [--max-ratio 0]

Generates a small lab kernel repo, starts a lab sshd on loopback as the build host, and builds
the same commits (walking the history, as a bisect's steps do: each commit after the first is an
incremental build) here and on the build host, interleaved so that machine load hits both
alike. Prints the median seconds per build of each and their ratio: on loopback the ratio is
the fixed cost of the round trip (git push, checkout, the log and changed artifacts fetched
back), which a real build host pays back when its build is faster. Also prints the bytes
fetched per remote step (an artifact already in the local cache is not fetched again).
Exits 1 when --max-ratio is set and exceeded, or a build fails. Everything lives in one
temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from fleetbisect.config.inventory import BuildHost  # noqa: E402
from fleetbisect.config.playbook import load_playbook  # noqa: E402
from fleetbisect.deadline import Deadline  # noqa: E402
from fleetbisect.lab.demo import lab_playbook  # noqa: E402
from fleetbisect.lab.image import ensure_assets  # noqa: E402
from fleetbisect.lab.kernelrepo import generate_repo  # noqa: E402
from fleetbisect.lab.vmhost import LabHost  # noqa: E402
from fleetbisect.stages.build import build  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-ratio", type=float, default=0.0, help="fail above this remote/local ratio (0: report only)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fb-bench-remotebuild-") as tmp:
        tmp = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")  # the artifact cache starts empty
        repo = generate_repo(tmp / "linux", ensure_assets(), commits=max(8, args.steps + 2), seed=3,
                             build_fails=[], no_ssh=[])
        playbook = load_playbook(lab_playbook())
        trees = {}
        for side in ("local", "remote"):
            trees[side] = tmp / f"wt-{side}"
            subprocess.run(["git", "-C", str(repo.path), "worktree", "add", "-q", "--detach", str(trees[side])], check=True)
        host = LabHost.start(tmp / "forge", name="forge")
        try:
            builder = BuildHost.model_validate({"name": "forge", "work_dir": str(tmp / "forge" / "build"), "ssh": {
                "address": "127.0.0.1", "port": host.port, "user": host.user, "key": str(host.user_key),
                "known_hosts": str(host.known_hosts)}})
            times: dict[str, list[float]] = {"local": [], "remote": []}
            fetched = []
            for i, sha in enumerate(repo.shas[1:args.steps + 1]):
                for side in ("local", "remote") if i % 2 == 0 else ("remote", "local"):
                    subprocess.run(["git", "-C", str(trees[side]), "checkout", "-q", "--detach", sha], check=True)
                    log = tmp / "steps" / f"{i}-{side}" / "build.log"
                    t = time.monotonic()
                    res = build(trees[side], playbook, sha, log, Deadline.after(300),
                                on=builder if side == "remote" else None)
                    times[side].append(time.monotonic() - t)
                    if not res.ok:
                        print(f"{side} build of {sha[:12]} failed: {res.summary}", file=sys.stderr)
                        return 1
                    if side == "remote":
                        fetched.append(log.read_text().splitlines()[-1].split(": ", 1)[1])
        finally:
            host.stop()
    local, remote = statistics.median(times["local"]), statistics.median(times["remote"])
    print(yaml.safe_dump({"steps": args.steps, "local_median_s": round(local, 3),
                          "build_host_median_s": round(remote, 3), "ratio_build_host_to_local": round(remote / local, 2),
                          "fetched_per_remote_step": fetched}, sort_keys=False), end="")
    return 1 if args.max_ratio and remote / local > args.max_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
