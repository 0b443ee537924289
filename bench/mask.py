"""Masking throughput: how fast does a build's output reach build.log through the mask?

    .venv/bin/python bench/mask.py [--mb 200] [--secrets 20] [--runs 3]

Generates --mb of kernel-build-like output (CC/LD lines, warnings, a few lines holding a
secret) and writes it to a log three ways, each timed from start to the last byte on disk:
`cat FILE > LOG` (the floor: what the old code cost, the child writing the log itself),
fleetbisect's run_logged with no secret registered (the pipe and the read loop), and
run_logged with --secrets registered (the pipe plus the mask). Prints MB/s (best of --runs)
and the ratio to the floor. A kernel build prints some 10-50 MB, at most a few MB/s.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetbisect import masking  # noqa: E402
from fleetbisect.deadline import Deadline  # noqa: E402
from fleetbisect.localexec import run_logged  # noqa: E402


def make_output(path: Path, mb: int, secrets: list[str]) -> None:
    rng = random.Random(1)
    dirs = ["drivers/net/ethernet/intel/e1000e", "fs/ext4", "kernel/sched", "arch/x86/kernel", "net/ipv4"]
    lines = []
    for i in range(20000):
        d = rng.choice(dirs)
        r = rng.random()
        if r < 0.01 and secrets:
            lines.append(f"  SIGN    {d}/mod{i}.ko with {rng.choice(secrets)}\n")
        elif r < 0.05:
            lines.append(f"{d}/f{i}.c:{rng.randint(1, 3000)}:5: warning: unused variable 'x{i}' [-Wunused-variable]\n")
        else:
            lines.append(f"  {rng.choice(['CC', 'LD', 'AR', 'CC [M]'])}      {d}/f{i}.o\n")
    block = "".join(lines).encode()
    with open(path, "wb") as f:
        for _ in range(max(1, mb * (1 << 20) // len(block))):
            f.write(block)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--secrets", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    secrets = [f"s3cret-{i:02d}-{os.urandom(8).hex()}" for i in range(args.secrets)]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "output.txt", Path(tmp) / "build.log"
        make_output(src, args.mb, secrets)
        size = src.stat().st_size / 1e6
        env = {"PATH": os.environ["PATH"]}

        def plain():
            subprocess.run(["sh", "-c", 'cat "$1" > "$2"', "sh", src, out], check=True)

        def logged():
            with masking.open_masked(out, "wb") as log:
                assert run_logged(["cat", str(src)], None, env, log, Deadline.after(3600)) == 0

        results = {}
        for name, fn, values in (("cat > log", plain, []), ("run_logged, no secret", logged, []),
                                 (f"run_logged, {len(secrets)} secrets", logged, secrets)):
            masking._values.clear()
            masking._add(values)
            results[name] = min(timed(fn) for _ in range(args.runs))
            if values:
                assert not any(s.encode() in out.read_bytes() for s in secrets), "a secret reached the log"
        floor = results["cat > log"]
        print(f"{size:.0f} MB of build output, best of {args.runs}:")
        for name, secs in results.items():
            print(f"  {name:<28} {size / secs:8.1f} MB/s  ({secs / floor:5.1f}x the time of cat)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
