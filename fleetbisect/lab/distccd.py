"""The lab's distcc daemon: a real `distccd` on a free loopback port, with its statistics
server, so a test can prove a compile went through it (`stats()["dcc_compile_ok"]`).

    d = LabDistccd.start(Path("/tmp/lab/distcc"))
    ...  DISTCC_HOSTS=d.host_spec, d.compiled()  ...
    d.stop()

It is started in a session of its own and stopped by its PID (SIGTERM: the master takes its
workers down with it), then whatever is left in its process group is killed; a finalizer does
the same if the object is dropped first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

from .libvirtd import _stop as terminate
from .vmhost import free_port, processes

DISTCCD = shutil.which("distccd") or "/usr/bin/distccd"
START_TIMEOUT = 10.0


STATS = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"


class LabDistccdError(RuntimeError):
    pass


def _stop(proc: subprocess.Popen) -> None:
    terminate([proc])  # SIGTERM (the master takes its workers down), SIGKILL after a grace
    for pid in [pid for pid, _, pgid in processes() if pgid == proc.pid]:  # workers left behind: our group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LabDistccd:
    def __init__(self, proc: subprocess.Popen, port: int, stats_port: int, log: Path, address: str = "127.0.0.1",
                 wrap=lambda argv: argv):
        self._proc = proc
        self.address = address
        self._wrap = wrap
        self.port = port
        self.stats_port = stats_port
        self.log = log
        self._finalizer = weakref.finalize(self, _stop, proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def host_spec(self) -> str:
        return f"{self.address}:{self.port}"

    @classmethod
    def start(cls, base_dir: Path, *, jobs: int = 2, timeout: float = START_TIMEOUT, address: str = "127.0.0.1",
              allow: str = "127.0.0.0/8", wrap=lambda argv: argv) -> "LabDistccd":
        """`wrap` runs the daemon elsewhere, e.g. in a network namespace (NetnsPair.run_in), as
        long as the process it starts execs the daemon (its PID is the daemon's)."""
        base_dir = Path(base_dir)
        base_dir.mkdir(parents=True, exist_ok=True)
        log = base_dir / "distccd.log"
        for _ in range(3):  # a probed port can be taken before distccd binds it: try another
            port, stats_port = free_port(), free_port()
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    wrap([DISTCCD, "--daemon", "--no-detach", "--listen", address, "--port", str(port),
                          "--allow", allow, "--stats", "--stats-port", str(stats_port), "--jobs", str(jobs),
                          "--log-stderr", "--log-level", "info"]),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True,
                )
            d = cls(proc, port, stats_port, log, address, wrap)
            if d._wait_ready(timeout):
                return d
            d.stop()
        raise LabDistccdError(f"distccd did not start: {log.read_text(errors='replace')[-500:]}")

    def _wait_ready(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self._proc.poll() is None:
            try:
                self.stats()
                return True
            except OSError:
                time.sleep(0.02)  # not listening yet
        return False

    def stats(self) -> dict[str, str]:
        """The daemon's own counters (its --stats HTTP server, read from where it runs):
        dcc_compile_ok and the rest."""
        url = f"http://{self.address}:{self.stats_port}/"
        proc = subprocess.run(self._wrap([sys.executable, "-c", STATS, url]), capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise OSError(proc.stderr.strip()[-300:])
        return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith("dcc_") and " " in line)

    def compiled(self) -> int:
        return int(self.stats()["dcc_compile_ok"])

    def stop(self) -> None:
        self._finalizer()
