"""Upload throughput: fleetbisect's SSHRemote.put against OpenSSH scp and the scp package.

    .venv/bin/python bench/push.py [--size-mib 1024] [--runs 3] [--min-ratio 1.2]

Starts a lab sshd on loopback (fleetbisect.lab.vmhost.LabHost), writes a test file of real
data (a 64 MiB urandom block repeated: incompressible, not sparse), uploads it with each method
`--runs` times (interleaved, so drift hits every method alike), prints the median MB/s per
method and the ratio of fleetbisect to OpenSSH scp twice: against scp's defaults (what a
script would run) and against the fastest scp invocation measured (scp -c with each of
OpenSSH's fast ciphers: the best a hand-tuned script could do). It also checks that pushing
an unchanged artifact sends nothing. Exits 1 when the ratio against scp's defaults is below
--min-ratio, the one against the fastest scp below --min-ratio-fastest, or a check fails. Everything it
creates lives in one temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetbisect.deadline import Deadline  # noqa: E402
from fleetbisect.lab.vmhost import LabHost  # noqa: E402
from fleetbisect.remote.ssh import SSHRemote  # noqa: E402

BLOCK = 64 << 20


def make_file(path: Path, size: int) -> None:
    block = os.urandom(min(BLOCK, size))
    with open(path, "wb") as f:
        left = size
        while left:
            n = f.write(block[: min(len(block), left)])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def timed(fn) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--min-ratio", type=float, default=1.2, help="goal vs scp's defaults")
    ap.add_argument("--min-ratio-fastest", type=float, default=0.0,
                    help="goal vs the fastest scp invocation (default: report only)")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the temporary directory")
    ap.add_argument("--sftp", default=None, help="the lab sshd's SFTP subsystem (default: sftp-server)")
    ap.add_argument("--no-verify", action="store_true", help="skip the sha256 check of each upload")
    args = ap.parse_args(argv)

    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="fleetbisect-bench-", dir=args.dir))
    failures: list[str] = []
    try:
        src = work / "artifact.bin"
        print(f"writing {args.size_mib} MiB of test data to {src} ...", flush=True)
        make_file(src, size)
        digest = sha256(src) if not args.no_verify else None
        dest_dir = work / "remote"
        dest_dir.mkdir()
        with LabHost.start(work / "host", name="bench-host", sftp=args.sftp) as host:
            remote = SSHRemote.connect(host.ssh_params(), deadline=Deadline.after(15))
            try:
                methods = build_methods(host, remote, src, dest_dir)
                results: dict[str, list[float]] = {name: [] for name in methods}
                for run in range(1, args.runs + 1):
                    for name, upload in methods.items():
                        dest = dest_dir / f"{name.split()[0]}.bin"
                        dest.unlink(missing_ok=True)
                        seconds = timed(lambda upload=upload, dest=dest: upload(dest))
                        mbps = size / 1e6 / seconds
                        results[name].append(mbps)
                        print(f"run {run}: {name:<28} {mbps:8.1f} MB/s", flush=True)
                        if digest is not None and sha256(dest) != digest:
                            failures.append(f"{name}: uploaded file differs from the source")
                        dest.unlink(missing_ok=True)
                failures += check_unchanged_costs_nothing(remote, src, work)
            finally:
                remote.close()
        print_table(results, args, failures)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for problem in failures:
        print(f"FAIL: {problem}")
    return 1 if failures else 0


def build_methods(host: LabHost, remote: SSHRemote, src: Path, dest_dir: Path) -> dict:
    import scp as scp_package

    def fleetbisect_put(dest: Path) -> None:
        remote.put(src, str(dest), deadline=Deadline.after(600))

    def paramiko_put(dest: Path) -> None:
        with open(src, "rb") as f:
            remote.put_stream(f, src.stat().st_size, str(dest), deadline=Deadline.after(600))

    def openssh_scp(dest: Path, *extra: str) -> None:
        subprocess.run(
            ["scp", "-q", *extra, *host.ssh_argv(), "-P", str(host.port), str(src),
             f"{host.user}@127.0.0.1:{dest}"],
            check=True, stdin=subprocess.DEVNULL,
        )

    def scp_package_put(dest: Path) -> None:
        client = scp_package.SCPClient(
            remote.transport(Deadline.after(15)), buff_size=1 << 20, socket_timeout=60
        )
        try:
            client.put(str(src), str(dest))
        finally:
            client.close()

    methods = {
        "fleetbisect SSHRemote.put": fleetbisect_put,
        "fleetbisect paramiko path only": paramiko_put,
        SCP_DEFAULTS: openssh_scp,
    }
    for cipher in SCP_CIPHERS:
        methods[f"{SCP_PREFIX} -c {cipher.split('@')[0]}"] = (
            lambda dest, cipher=cipher: openssh_scp(dest, "-c", cipher))
    methods["scp package SCPClient.put"] = scp_package_put
    return methods


SCP_PREFIX = "scp (OpenSSH)"
SCP_DEFAULTS = f"{SCP_PREFIX} defaults"
# OpenSSH's fast ciphers: the baselines a hand-tuned `scp -c` could pick
SCP_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
               "chacha20-poly1305@openssh.com", "aes128-ctr")


def check_unchanged_costs_nothing(remote: SSHRemote, src: Path, work: Path) -> list[str]:
    """Push the same artifact twice through the push stage: the second push sends 0 bytes."""
    try:
        from fleetbisect.stages.push import push
    except ImportError as e:  # the push stage is not there yet
        print(f"unchanged-artifact check skipped: {e}")
        return []
    work_dir = str(work / "remote-work")
    first = push(remote, work_dir, {"kernel": src}, Deadline.after(600))
    second = push(remote, work_dir, {"kernel": src}, Deadline.after(600))
    sent = sum(second.uploaded.values())
    print(f"unchanged artifact: first push sent {sum(first.uploaded.values())} bytes, "
          f"second push sent {sent} bytes in {second.seconds:.2f}s")
    if sent:
        return [f"pushing an unchanged artifact sent {sent} bytes"]
    return []


def print_table(results: dict[str, list[float]], args, failures: list[str]) -> None:
    medians = {name: statistics.median(v) for name, v in results.items()}
    base = medians[SCP_DEFAULTS]
    fastest_name = max((n for n in medians if n.startswith(SCP_PREFIX)), key=medians.__getitem__)
    fastest = medians[fastest_name]
    print()
    print(f"upload of {args.size_mib} MiB to a loopback sshd, median of {args.runs} (MB/s)")
    print(f"{'method':<36} {'median':>8} {'runs':>20} {'vs scp':>7} {'vs fastest scp':>15}")
    for name, med in medians.items():
        runs = " ".join(f"{x:.0f}" for x in results[name])
        print(f"{name:<36} {med:8.1f} {runs:>20} {med / base:6.2f}x {med / fastest:14.2f}x")
    ours = medians["fleetbisect SSHRemote.put"]
    print(f"\nratio fleetbisect / OpenSSH scp (defaults): {ours / base:.2f} (goal >= {args.min_ratio})")
    print(f"ratio fleetbisect / fastest scp ({fastest_name}): {ours / fastest:.2f}"
          + (f" (goal >= {args.min_ratio_fastest})" if args.min_ratio_fastest else ""))
    if ours / base < args.min_ratio:
        failures.append(f"ratio vs scp's defaults {ours / base:.2f} is below {args.min_ratio}")
    if ours / fastest < args.min_ratio_fastest:
        failures.append(f"ratio vs the fastest scp {ours / fastest:.2f} is below "
                        f"{args.min_ratio_fastest}")


if __name__ == "__main__":
    sys.exit(main())
