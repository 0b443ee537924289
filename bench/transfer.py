"""Stress-copy throughput into one lab guest, by every way scp-stress can move the bytes.

    .venv/bin/python bench/transfer.py [--size 16M] [--runs 3]

Starts a lab host (real sshd on loopback), boots one lab guest through it, and copies --size
bytes into the guest's /tmp --runs times by each way, in rotating order, through the code
scp-stress itself runs (reproducers/transfer.py, host_source.py), each watched for stalls as in
a step:

- direct (the controller to the guest's forwarded port, `via: direct`) and through the host
  (`via: host`: fleetbisect's paramiko `direct-tcpip` channel; OpenSSH's ProxyJump) for
  `sftp`, `scp` (the scp protocol over paramiko) and `openssh-scp` (`scp -O`, the user's tool);
- `source: host` (the host's own scp into the guest; no stress byte crosses the controller's
  link).

Prints the median MB/s of each and its ratio to OpenSSH scp on the same path. Under TCG the
guest, not the link, is the limit (~30 MB/s, LAB.md), and relays into slirp are slow on this
lab (not on real VM hosts); the machine is shared with other work: compare ratios.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetbisect.config.inventory import load_inventory  # noqa: E402
from fleetbisect.config.loader import parse_bytes  # noqa: E402
from fleetbisect.deadline import Deadline  # noqa: E402
from fleetbisect.lab.demo import write_lab_inventory  # noqa: E402
from fleetbisect.lab.image import ensure_assets  # noqa: E402
from fleetbisect.lab.vmhost import LabHost  # noqa: E402
from fleetbisect.remote.base import RemoteError  # noqa: E402
from fleetbisect.remote.ssh import SSHRemote  # noqa: E402
from fleetbisect.reproducers import ReproContext, host_source, transfer  # noqa: E402
from fleetbisect.reproducers.watch import Watch  # noqa: E402
from fleetbisect.targets.qemu import Qemu  # noqa: E402

DEST = "/tmp/bench-stress.bin"


def copy_once(way: tuple[str, str], guests: dict, host, size: int, host_copy) -> float:
    path, method = way
    deadline = Deadline.after(300)
    watch = Watch(10.0, deadline=deadline)
    with watch:
        if method == "source: host":
            stats = host_copy(deadline, watch)
        else:
            stats = transfer.put(method, guests[path], size, DEST, deadline, watch, os.urandom(1 << 20),
                                 host if path == "host" else None)
    got = guests["direct"].run(["wc", "-c", DEST], deadline=Deadline.after(30)).stdout.split()[0]
    assert int(got) == size, (way, got)
    return stats.bytes / 1e6 / stats.seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="16M")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size = parse_bytes(args.size)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    assets = ensure_assets()
    transfer.stress_file(size)  # made once, as a run does, outside the measurement
    ways = [(p, m) for p in ("direct", "host") for m in ("openssh-scp", "scp", "sftp")] + [("host", "source: host")]
    rates: dict[tuple[str, str], list[float]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory(prefix="fb-bench-transfer-") as tmp:
        tmp = Path(tmp)
        with LabHost.start(tmp / "host", name="bench-host") as lab:
            host_cfg = load_inventory([write_lab_inventory(tmp / "inv.yaml", [lab], assets)]).host(lab.name)
            boot = SimpleNamespace(memory=512, cpus=1, cmdline="console=ttyS0 panic=-1 quiet", root=None,
                                   qemu_args=[], timeout=120)
            target = Qemu(host_cfg, SimpleNamespace(boot=boot, disk_image=None))
            host = SSHRemote.connect(lab.ssh_params(), deadline=Deadline.after(15))
            step_dir = tmp / "step"
            step_dir.mkdir()
            try:
                target.start(host, {"kernel": str(assets.kernel), "initrd": str(assets.base_initramfs)},
                             step_dir, Deadline.after(60))
                deadline = Deadline.after(120)
                while not target.probe(host):
                    if deadline.expired:
                        raise RemoteError("bench", "the guest never answered")
                    time.sleep(0.05)
                params = target.guest_params()
                g = host_cfg.target.guest
                guests = {
                    "direct": SSHRemote.connect(params, deadline=Deadline.after(30)),
                    "host": SSHRemote.connect(params, deadline=Deadline.after(30),
                                              sock=host.open_tunnel(g.address, g.port, Deadline.after(30))),
                }
                spec = SimpleNamespace(size=size, dest=DEST)
                host_copy = host_source.prepare(spec, ReproContext(guests["direct"], host, step_dir, print,
                                                                   target=target))
                for run in range(args.runs):
                    for way in ways[run % len(ways):] + ways[:run % len(ways)]:
                        rates[way].append(copy_once(way, guests, host, size, host_copy))
                for guest in guests.values():
                    guest.close()
            finally:
                target.stop(host, Deadline.after(30))
                host.close()
    print(f"{args.size} into one lab guest (TCG), median of {args.runs}, MB/s; the machine is shared")
    print(f"{'path':<8}{'method':<14}{'MB/s':>8}{'vs OpenSSH scp':>16}")
    for way in ways:
        base = statistics.median(rates[(way[0], "openssh-scp")])
        mbs = statistics.median(rates[way])
        print(f"{way[0]:<8}{way[1]:<14}{mbs:>8.1f}{mbs / base:>15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
