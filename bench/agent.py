"""Guest agent vs SSH: readiness, per-command latency and upload speed into the same lab guest.

    .venv/bin/python bench/agent.py [--runs 30] [--upload 4M]

Starts a lab host (real sshd on loopback), boots one lab guest through it with the agent's
virtio-serial channel and qemu-ga in its initramfs (lab/agent.py) AND its sshd forwarded, so
both paths reach the very same guest in the same run:

- SSH: paramiko to the guest's dropbear on the hostfwd port (what `reach: ssh, via: direct`
  does);
- agent: guest-exec + guest-exec-status polling through a relay (socat) started over the
  host's SSH connection to QEMU's unix socket (what `reach: agent` does).

Prints the time from QEMU's launch until each path first answers, the median and 90th
percentile of `true` run N times each way, an upload of --upload bytes each way, and the
ratios agent/SSH. Numbers under TCG on a shared machine: compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetbisect.config.inventory import load_inventory  # noqa: E402
from fleetbisect.config.loader import parse_bytes  # noqa: E402
from fleetbisect.deadline import Deadline  # noqa: E402
from fleetbisect.lab.agent import ensure_agent_overlay  # noqa: E402
from fleetbisect.lab.demo import write_lab_inventory  # noqa: E402
from fleetbisect.lab.image import ensure_assets  # noqa: E402
from fleetbisect.lab.vmhost import LabHost  # noqa: E402
from fleetbisect.remote.agent import AgentRemote, StreamTransport, relay_opener  # noqa: E402
from fleetbisect.remote.base import RemoteError  # noqa: E402
from fleetbisect.remote.ssh import SSHRemote  # noqa: E402
from fleetbisect.targets.qemu import Qemu  # noqa: E402

import yaml  # noqa: E402


def first_answer(connect, deadline: Deadline):
    """Poll `connect(deadline)` until it returns a session; (session, seconds)."""
    started = time.monotonic()
    while True:
        try:
            return connect(deadline), time.monotonic() - started
        except RemoteError:
            if deadline.expired:
                raise
            time.sleep(0.05)


def per_command(remote, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.monotonic()
        res = remote.run(["true"], deadline=Deadline.after(30))
        out.append(time.monotonic() - t)
        assert res.ok, res
    return out


def upload(remote, size: int) -> float:
    data = os.urandom(size)
    stats = remote.put_stream(io.BytesIO(data), size, "/tmp/bench.bin", deadline=Deadline.after(600))
    got = remote.run(["wc", "-c", "/tmp/bench.bin"], deadline=Deadline.after(30)).stdout.split()[0]
    assert int(got) == size, got
    return stats.mb_per_s


def p90(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.9) - 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--upload", default="4M")
    args = ap.parse_args()
    size = parse_bytes(args.upload)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    assets = ensure_assets()
    overlay = ensure_agent_overlay(assets)
    with tempfile.TemporaryDirectory(prefix="fb-bench-agent-") as tmp:
        tmp = Path(tmp)
        initrd = tmp / "initrd.img"
        initrd.write_bytes(assets.base_initramfs.read_bytes() + overlay.read_bytes())
        with LabHost.start(tmp / "host", name="bench-host") as lab:
            inv = write_lab_inventory(tmp / "inv.yaml", [lab], assets)
            data = yaml.safe_load(inv.read_text())
            data["hosts"][lab.name]["target"]["guest"]["agent"] = True  # SSH and the agent, one guest
            inv.write_text(yaml.safe_dump(data))
            host_cfg = load_inventory([inv]).host(lab.name)
            boot = SimpleNamespace(memory=512, cpus=1, cmdline="console=ttyS0 panic=-1 quiet", root=None,
                                   qemu_args=[], timeout=120)
            target = Qemu(host_cfg, SimpleNamespace(boot=boot))
            host = SSHRemote.connect(lab.ssh_params(), deadline=Deadline.after(15))
            step_dir = tmp / "step"
            step_dir.mkdir()
            try:
                target.start(host, {"kernel": str(assets.kernel), "initrd": str(initrd)}, step_dir,
                             Deadline.after(60))
                ready: dict[str, tuple] = {}

                def wait(name, connect):
                    ready[name] = first_answer(connect, Deadline.after(120))

                def ssh_connect(d):  # as a step waits: a banner probe, then the login
                    if not target.probe(host):
                        raise RemoteError("bench/guest", "no SSH banner yet")
                    return target.login(host, d)

                agent_connect = lambda d: AgentRemote.connect(  # noqa: E731
                    StreamTransport("bench/guest", relay_opener(host, target.paths.agent_socket)),
                    deadline=d.sub(2))
                threads = [threading.Thread(target=wait, args=("ssh", ssh_connect)),
                           threading.Thread(target=wait, args=("agent", agent_connect))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                ssh, ssh_ready = ready["ssh"]
                agent, agent_ready = ready["agent"]
                per_command(ssh, 3), per_command(agent, 3)  # warm both paths
                ssh_cmd = per_command(ssh, args.runs)
                agent_cmd = per_command(agent, args.runs)
                ssh_up = upload(ssh, size)
                agent_up = upload(agent, size)
                ssh.close()
                agent.close()
            finally:
                target.stop(host, Deadline.after(30))
                host.close()
    print(f"one lab guest under TCG, reached both ways ({args.runs} runs of `true`, upload {args.upload})")
    print(f"{'':<28}{'SSH':>10}{'agent':>10}{'agent/SSH':>11}")
    print(f"{'launch -> first answer (s)':<28}{ssh_ready:>10.2f}{agent_ready:>10.2f}{agent_ready / ssh_ready:>10.2f}x")
    for label, f in (("per command, median (ms)", statistics.median), ("per command, p90 (ms)", p90)):
        s, a = f(ssh_cmd) * 1000, f(agent_cmd) * 1000
        print(f"{label:<28}{s:>10.1f}{a:>10.1f}{a / s:>10.2f}x")
    print(f"{'upload (MB/s)':<28}{ssh_up:>10.2f}{agent_up:>10.2f}{agent_up / ssh_up:>10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
