"""Ready latency: how long after the guest's SSH server starts listening does a step go on?

    .venv/bin/python bench/ready.py [--runs 10] [--max-latency 0.25]

A lab sshd plays the guest's SSH server, behind a gate on another loopback port that behaves
like QEMU's slirp before the guest listens: it accepts each connection and drops it at once.
At a random moment (0.3-1.5 s after the wait began) the gate "opens" and relays to the sshd;
latency is the time from that moment to a logged-in session. Measured for fleetbisect's
`wait_ready` (banner probe every 50 ms, then the login) and, in the same session, for the
loop hand-written scripts use (`until ssh -o ConnectTimeout=1 guest true; do sleep 1; done`,
here with paramiko so both sides pay the same handshake). Prints medians, the worst case and
the ratio; exits 1 when fleetbisect's worst case exceeds --max-latency.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetbisect.deadline import Deadline  # noqa: E402
from fleetbisect.lab.vmhost import LabHost  # noqa: E402
from fleetbisect.remote.base import RemoteError, SSHParams  # noqa: E402
from fleetbisect.remote.ssh import SSHRemote  # noqa: E402
from fleetbisect.targets.qemu import VMPaths, vm_alive  # noqa: E402
from fleetbisect.stages.ready import GuestEndpoint, probe_banner, wait_ready  # noqa: E402


class Gate:
    """A loopback port that drops connections until open(), then relays to `target_port`."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.opened_at: float | None = None
        self._open = threading.Event()
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def open(self) -> None:
        self.opened_at = time.monotonic()
        self._open.set()

    def close(self) -> None:
        self._stop = True
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self._open.is_set():
                conn.close()  # slirp before the guest listens: accepted, then gone
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def guest_params(host: LabHost, port: int) -> SSHParams:
    return SSHParams(name="bench/guest", host="127.0.0.1", port=port, user=host.user,
                     key_files=(str(host.user_key),), host_keys=(host.host_public_key,))


def fleetbisect_wait(host: LabHost, remote: SSHRemote, paths: VMPaths, gate: Gate) -> SSHRemote:
    params = guest_params(host, gate.port)
    guest, _ = wait_ready(
        lambda d: vm_alive(remote, paths, d), lambda: probe_banner(GuestEndpoint("127.0.0.1", gate.port)),
        lambda d: SSHRemote.connect(params, deadline=d), Deadline.after(30),
    )
    return guest


def script_wait(host: LabHost, remote: SSHRemote, paths: VMPaths, gate: Gate) -> SSHRemote:
    params = guest_params(host, gate.port)
    while True:
        try:
            return SSHRemote.connect(params, deadline=Deadline.after(1))
        except RemoteError:
            time.sleep(1)


def measure(fn, host, remote, paths, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        gate = Gate(host.port)
        timer = threading.Timer(random.uniform(0.3, 1.5), gate.open)
        timer.start()
        try:
            guest = fn(host, remote, paths, gate)
            done = time.monotonic()
            guest.close()
        finally:
            timer.cancel()
            gate.close()
        out.append(done - gate.opened_at)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--max-latency", type=float, default=0.25)
    args = ap.parse_args()
    random.seed(1)
    # The sleep-1 loop's failed handshakes make paramiko log tracebacks; they are expected here.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="fb-bench-ready-") as tmp:
        with LabHost.start(Path(tmp) / "host", name="bench-host") as host:
            remote = SSHRemote.connect(host.ssh_params(), deadline=Deadline.after(15))
            # wait_ready checks that "QEMU" is alive through its pidfile: this process plays it.
            paths = VMPaths(str(Path(tmp) / "vm"))
            os.makedirs(paths.dir)
            Path(paths.pidfile).write_text(str(os.getpid()))
            try:
                ours = measure(fleetbisect_wait, host, remote, paths, args.runs)
                theirs = measure(script_wait, host, remote, paths, args.runs)
            finally:
                remote.close()
    print(f"latency from 'SSH server listening' to a logged-in session, {args.runs} runs (seconds)")
    for name, xs in (("fleetbisect wait_ready", ours), ("sleep-1 retry loop", theirs)):
        print(f"{name:<24} median {statistics.median(xs):.3f}  max {max(xs):.3f}  "
              f"all {' '.join(f'{x:.2f}' for x in xs)}")
    print(f"ratio (loop median / fleetbisect median): {statistics.median(theirs) / statistics.median(ours):.1f}x")
    ok = max(ours) <= args.max_latency
    print(f"fleetbisect worst case {max(ours):.3f}s {'<=' if ok else '>'} {args.max_latency}s goal")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
