"""The lab box's BMCs, speaking the real protocols on loopback, driving its libvirt domain the
way OpenStack Ironic's CI does: IPMI through virtualbmc (`vbmcd`, one IPMI endpoint per
domain), Redfish through sushy-tools' emulator (libvirt driver, HTTP basic auth from an
htpasswd file). fleetbisect talks to them with ipmitool and plain HTTP requests, as to real ones.

    with VirtualBMC.start(dir, box.name, user, password) as ipmi:    # ipmi.port
    with SushyEmulator.start(dir, box.name, user, password) as rf:   # rf.url, rf.system

Both daemons are this lab's own: started here, tracked by PID, stopped by PID (their process
group: vbmcd serves each domain from a child process) by stop() or a finalizer. The password
given here is the BMC's (the lab is its owner); the controller reads it from the environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

from .libvirtd import URI, virsh
from .vmhost import free_port

START_TIMEOUT = 120.0


class LabBMCError(RuntimeError):
    pass


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name  # installed with fleetbisect's test extra
    if not path.exists():
        raise LabBMCError(f"{name} is not installed in {path.parent} (pip install virtualbmc sushy-tools; "
                          ".ci/setup does it)")
    return str(path)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this lab started (start_new_session)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _launch(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, close_fds=True)


class _Daemon:
    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc, self.log = proc, log
        self._finalizer = weakref.finalize(self, _stop, proc)

    def stop(self) -> None:
        self._finalizer()

    def log_tail(self, n: int = 5) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class VirtualBMC(_Daemon):
    """vbmcd with one IPMI endpoint (127.0.0.1:port, lanplus) for `domain`."""

    def __init__(self, proc, log, port: int, env: dict):
        super().__init__(proc, log)
        self.port, self.address, self.env = port, "127.0.0.1", env

    @classmethod
    def start(cls, base_dir: Path, domain: str, user: str, password: str,
              timeout: float = START_TIMEOUT) -> "VirtualBMC":
        base_dir = Path(base_dir)
        conf_dir = base_dir / "vbmc"
        conf_dir.mkdir(parents=True, exist_ok=True)
        conf = base_dir / "virtualbmc.conf"
        conf.write_text(f"[default]\nconfig_dir = {conf_dir}\npid_file = {base_dir / 'vbmcd.pid'}\n"
                        f"server_port = {free_port()}\nshow_passwords = false\n"
                        f"[log]\nlogfile = {base_dir / 'vbmcd.log'}\n")
        env = dict(os.environ, VIRTUALBMC_CONFIG=str(conf))
        port = free_port()
        bmc = cls(_launch([_tool("vbmcd"), "--foreground"], base_dir / "vbmcd.out", env), base_dir / "vbmcd.log",
                  port, env)
        try:
            end = time.monotonic() + timeout
            bmc._vbmc(end, "add", domain, "--port", str(port), "--address", "127.0.0.1", "--username", user,
                      "--password", password, "--libvirt-uri", URI)
            bmc._vbmc(end, "start", domain)
            bmc._wait_ipmi(end, user, password)
        except BaseException:
            bmc.stop()
            raise
        return bmc

    def _vbmc(self, end: float, *args: str) -> str:
        while True:  # vbmcd answers its control port a moment after it starts
            proc = subprocess.run([_tool("vbmc"), *args], env=self.env, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=60)
            if proc.returncode == 0:
                return proc.stdout
            if self.proc.poll() is not None or time.monotonic() > end:
                raise LabBMCError(f"vbmc {' '.join(args[:2])}: {proc.stderr.strip()}; vbmcd: {self.log_tail()}")
            time.sleep(0.2)

    def _wait_ipmi(self, end: float, user: str, password: str) -> None:
        argv = ["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(self.port), "-U", user, "-E",
                "-N", "1", "-R", "1", "chassis", "power", "status"]
        while True:
            proc = subprocess.run(argv, env=dict(os.environ, IPMI_PASSWORD=password), capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL, timeout=30)
            if proc.returncode == 0:
                return
            if time.monotonic() > end:
                raise LabBMCError(f"the IPMI endpoint on port {self.port} did not answer: {proc.stderr.strip()}; "
                                  f"vbmcd: {self.log_tail()}")
            time.sleep(0.2)


class SushyEmulator(_Daemon):
    """sushy-emulator (libvirt driver) serving only `domain`, behind HTTP basic auth."""

    def __init__(self, proc, log, port: int, system: str):
        super().__init__(proc, log)
        self.port, self.system = port, system
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, base_dir: Path, domain: str, user: str, password: str,
              timeout: float = START_TIMEOUT) -> "SushyEmulator":
        import bcrypt  # a dependency of sushy-tools

        base_dir = Path(base_dir)
        base_dir.mkdir(parents=True, exist_ok=True)
        htpasswd = base_dir / "sushy.htpasswd"
        htpasswd.write_text(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
        htpasswd.chmod(0o600)
        uuid = virsh("domuuid", domain).stdout.strip()
        conf = base_dir / "sushy.conf"
        conf.write_text(f"SUSHY_EMULATOR_LIBVIRT_URI = {URI!r}\nSUSHY_EMULATOR_AUTH_FILE = {str(htpasswd)!r}\n"
                        f"SUSHY_EMULATOR_ALLOWED_INSTANCES = [{uuid!r}]\n"
                        "SUSHY_EMULATOR_IGNORE_BOOT_DEVICE = True\n")
        port = free_port()
        emu = cls(_launch([_tool("sushy-emulator"), "--config", str(conf), "-i", "127.0.0.1", "-p", str(port)],
                          base_dir / "sushy.log"), base_dir / "sushy.log", port, uuid)
        try:
            emu._wait(time.monotonic() + timeout)
        except BaseException:
            emu.stop()
            raise
        return emu

    def _wait(self, end: float) -> None:
        while True:
            try:  # unauthenticated: the service root answers 401, which proves it listens
                with urllib.request.urlopen(self.url + "/redfish/v1/", timeout=2) as r:
                    json.load(r)
                return
            except urllib.error.HTTPError:
                return
            except OSError as e:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise LabBMCError(f"sushy-emulator did not answer on {self.url}: {e}; {self.log_tail()}")
            time.sleep(0.2)
