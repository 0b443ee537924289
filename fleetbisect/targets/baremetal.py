"""`kind: baremetal`: the host itself boots the kernel under test (model: config/baremetal.py).

Per step, through the target seam:

    connect()  SSH to the box; a box that does not answer is recovered first (below)
    stop()     the box back on its default kernel (before and after each step): a plain
               reboot from a candidate; a box that does not answer SSH within deadlines.answer,
               or whose reboot hangs, is recovered (below)
    deploy()   install the pushed kernel (+ initrd, + modules) as BOOT_DIR/vmlinuz-<release>,
               removing the older test kernels first (bootonce.py)
    start()    make it the ONE-SHOT boot (kexec -l + kexec -e, grub-reboot ENTRY + reboot, or
               the inventory's command), then wait until the box stops answering (deadlines.down)
    alive()    the BMC says the power is on; probe()/login(): the box's own sshd
    (step.py)  verify: the box must print the build's release; a box that fell back to its
               default kernel prints another one: wrong-kernel, a skip, never good
    fetch_console()  the console since start(): a serial log file, or pstore after the reboot,
               plus what the recovery did (recovery.log)

Recovery, when the box does not come back: NMI (the kernel prints its backtrace on the console)
→ deadlines.nmi for it to print → power cycle → wait for the DEFAULT kernel (default_release)
within deadlines.recover. The step's verdict comes from the policy (boot-failed: skip, or bad
when bisecting a boot failure). `recoveries` failed recoveries in a row stop the run: the box
needs a human. The permanent default boot entry is never changed; restore() (run end, abort,
resume) boots the box back to its known-good kernel, checks it and removes the test kernels.
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path
from typing import Mapping

from ..config.baremetal import BaremetalConfig
from ..deadline import Deadline
from ..errors import InfraError, RunAborted, UserError
from ..files import write_text_masked
from ..power import PowerAuthError, PowerError, PowerUnsupported, for_config
from ..remote.base import Remote, RemoteError, SSHParams
from . import bootonce
from .base import Check, Target, TargetStartFailed

log = logging.getLogger("fleetbisect.baremetal")

POLL = 0.2
# Failed recoveries in a row, per host, in this controller: `recoveries` of them stop the run.
_FAILED: dict[str, int] = {}


class BoxNeedsHuman(RunAborted):
    """Recovery failed `recoveries` times in a row: nothing more can be done unattended."""


class NotBack(InfraError):
    """The box did not come back on its default kernel."""


class Baremetal(Target):
    kind = "baremetal"
    Config = BaremetalConfig
    reboots_host = True
    min_free_mb = 256  # a kernel, an initrd and modules: no VM disk images on a box

    def __init__(self, host_cfg, playbook):
        super().__init__(host_cfg, playbook)
        self.power = for_config(self.config.power)
        self.release: str | None = None
        self.step_dir: Path | None = None
        self.installed: tuple[str, str | None] | None = None
        self._console_mark = self._console_size()  # the console of this attempt starts here
        self._console_cut: int | None = None  # where our power cycle began (what follows is ours)
        self._notes: list[str] = []

    # --- how the box is reached: it is the host ------------------------------------------------

    def endpoint(self, host: Remote):
        from ..stages.ready import GuestEndpoint

        ssh = self.host_cfg.ssh
        return GuestEndpoint(ssh.address or ssh.alias, ssh.port or 22, None)

    def guest_params(self) -> SSHParams:
        return self.host_cfg.ssh_params()

    def login(self, host: Remote, deadline: Deadline) -> Remote:
        from ..remote.ssh import SSHRemote

        return SSHRemote.connect(self.host_cfg.ssh_params(), deadline=deadline)

    def connect(self, connect, deadline: Deadline) -> Remote:
        try:
            return connect(self.host_cfg, deadline)
        except RemoteError as e:
            self._recover(f"the box does not answer SSH ({e})")
        return connect(self.host_cfg, Deadline.after(self.host_cfg.ssh.connect_timeout + 5))

    def expect(self, release: str | None) -> None:
        self.release = release

    def _answers(self, seconds: float) -> bool:
        """The box's sshd says hello within `seconds`."""
        deadline = Deadline.after(seconds)
        while True:
            if self.probe(None):
                return True
            if deadline.expired:
                return False
            time.sleep(POLL)

    def _running(self, box: Remote, deadline: Deadline) -> str:
        res = box.run(self.playbook.verify.command, deadline=deadline)
        if not res.ok:
            raise InfraError(f"cannot tell which kernel the box runs: `{self.playbook.verify.command}` "
                             f"exited {res.exit_status}")
        return res.stdout.strip()

    # --- once per run ------------------------------------------------------------------------

    def probes(self, host: Remote, deadline: Deadline) -> list[Check]:
        cfg = self.config
        checks = []
        try:
            checks.append(Check("power", True, f"{self.power.describe()}: {self.power.check(deadline.sub(30))}"))
        except (PowerError, UserError) as e:
            checks.append(Check("power", False, str(e)))
        if self.playbook.console_only:
            checks.append(Check("playbook", False, "a console-only playbook cannot run on a bare-metal box: "
                                "its reproducer runs on the box over SSH"))
        tool = {"kexec": "kexec", "grub": cfg.oneshot.grub_reboot, "command": cfg.oneshot.command[0]
                if cfg.oneshot.command else ""}[cfg.oneshot.method]
        res = host.run(["sh", "-c", 'command -v "$1"', "sh", tool], deadline=deadline.sub(15))
        checks.append(Check("one-shot boot", res.ok, f"{cfg.oneshot.method}: {res.stdout.strip()}" if res.ok
                            else f"{tool} not found on the box (one-shot method {cfg.oneshot.method})"))
        if cfg.oneshot.method == "grub":
            res = host.run(["sh", "-c", "grep -qs '^GRUB_DEFAULT=saved' /etc/default/grub"], deadline=deadline.sub(15))
            checks.append(Check("grub default", res.ok, "GRUB_DEFAULT=saved" if res.ok else
                                "grub-reboot needs GRUB_DEFAULT=saved in /etc/default/grub (then update-grub)"))
        res = host.run(["sh", "-c", 'mkdir -p "$1" && [ -w "$1" ] && df -Pk "$1" | awk \'NR==2 {print $4}\'',
                        "sh", cfg.boot_dir], deadline=deadline.sub(15))
        checks.append(Check("boot dir", res.ok, f"{cfg.boot_dir}: {res.stdout.strip()} KiB free" if res.ok
                            else f"{cfg.boot_dir} is not writable on the box"))
        try:
            running = self._running(host, deadline.sub(30))
            on_default = running == cfg.default_release
            checks.append(Check("default kernel", on_default, f"the box runs its known-good {running}" if on_default
                                else f"the box runs {running!r}, not its known-good default {cfg.default_release!r} "
                                "(a run left it there? `fleetbisect resume` boots it back; else fix default_release)"))
        except InfraError as e:
            checks.append(Check("default kernel", False, str(e)))
        if cfg.console.kind == "file":
            ok = Path(cfg.console.path).is_file()
            checks.append(Check("console", ok, cfg.console.path if ok else f"{cfg.console.path}: no such file here"))
        return checks

    def restore(self, host: Remote, deadline: Deadline) -> str:
        """Back to the known-good kernel, checked; the test kernels removed."""
        done = [d for d in [self.stop(host, deadline)] if d]
        with self.login(None, Deadline.after(60)) as box:
            res = box.run(["sh", "-c", bootonce.REMOVE_ALL, "sh", self.config.boot_dir,
                           bootonce.manifest(self.host_cfg.work_dir)], deadline=deadline.sub(60))
            if res.stdout.strip():
                done.append(res.stdout.strip().replace("\n", ", "))
                if self.config.oneshot.method == "grub":
                    box.run(self.config.oneshot.update_grub, deadline=deadline.sub(120))
            running = self._running(box, deadline.sub(30))
        if running != self.config.default_release:
            raise InfraError(f"the box runs {running!r} after restore, not {self.config.default_release!r}")
        _FAILED.pop(self.host_cfg.name, None)
        return "; ".join(done) or f"on its known-good {running}"

    # --- per step ----------------------------------------------------------------------------

    def stop(self, host: Remote, deadline: Deadline) -> str:
        """The box back on its default kernel: every step installs and pushes under the
        known-good kernel (a candidate's broken network or disk never fails the next step's
        push), and a candidate whose reboot hangs is power cycled here, not left for start()."""
        if not self._answers(self.config.deadlines.answer):
            return self._recover(f"the box did not answer SSH within {self.config.deadlines.answer:.0f}s")
        try:
            with self.login(None, Deadline.after(30)) as box:
                running = self._running(box, Deadline.after(30))
                if running == self.config.default_release:
                    return ""
                self._note(f"the box runs {running}: rebooting it into its default kernel")
                self._reboot(box, self.config.oneshot.reboot)  # a one-shot boot is used once
            self._wait_default(Deadline.after(self.config.deadlines.recover)).close()
        except (NotBack, TargetStartFailed, InfraError) as e:
            return self._recover(f"a reboot did not bring the default kernel back ({e})")
        done = f"rebooted from {running} into its known-good {self.config.default_release}"
        self._note(done)
        return done

    def deploy(self, host: Remote, artifacts: Mapping[str, str], step_dir: Path, deadline: Deadline) -> None:
        self.step_dir = step_dir
        if "kernel" not in artifacts:
            raise UserError("a bare-metal step installs a kernel: the playbook's artifacts need `kernel`")
        name = bootonce.install_name(self.release, posixpath_base(artifacts["kernel"]))
        res = host.run(["sh", "-c", bootonce.INSTALL, "sh", self.config.boot_dir, name,
                        bootonce.manifest(self.host_cfg.work_dir), artifacts["kernel"],
                        artifacts.get("initrd", ""), artifacts.get("modules", "")], deadline=deadline.sub(300))
        self._note(res.stdout.strip())
        if not res.ok:
            raise InfraError(f"installing the kernel on the box failed: {(res.stderr or res.stdout).strip()[-400:]}")
        self.installed = bootonce.paths(self.config.boot_dir, name, "initrd" in artifacts)
        if self.config.oneshot.method == "grub":
            res = host.run(self.config.oneshot.update_grub, deadline=deadline.sub(300))
            if not res.ok:
                raise InfraError(f"{' '.join(self.config.oneshot.update_grub)} failed: {res.stderr.strip()[-400:]}")

    def start(self, host: Remote, artifacts: Mapping[str, str], step_dir: Path, deadline: Deadline) -> None:
        self.step_dir = step_dir
        if self.installed is None:
            raise TargetStartFailed("nothing installed to boot (deploy did not run)")
        kernel, initrd = self.installed
        cmdline = self.playbook.boot.cmdline
        method = self.config.oneshot.method
        commands = []
        if method == "kexec":
            load = bootonce.kexec_load_argv(kernel, initrd, cmdline)
            commands.append(load)
            res = host.run(load, deadline=deadline.sub(60))
            if not res.ok:
                raise TargetStartFailed(f"kexec -l refused the kernel: {(res.stderr or res.stdout).strip()[-300:]}")
            trigger = ["kexec", "-e"]
        elif method == "grub":
            cfg = host.run(["cat", self.config.oneshot.grub_cfg], deadline=deadline.sub(30), check=True).stdout
            entry = bootonce.grub_entry(cfg, kernel.rsplit("/", 1)[-1])
            once = [self.config.oneshot.grub_reboot, entry]
            commands.append(once)
            res = host.run(once, deadline=deadline.sub(60))
            if not res.ok:
                raise TargetStartFailed(f"{once[0]} failed: {(res.stderr or res.stdout).strip()[-300:]}")
            trigger = self.config.oneshot.reboot
        else:
            trigger = bootonce.command_argv(self.config.oneshot.command, kernel=kernel, initrd=initrd,
                                            cmdline=cmdline, release=self.release or "")
        commands.append(trigger)
        write_text_masked(step_dir / "commands.txt", "".join(shlex.join(c) + "\n" for c in commands))
        self._console_mark = self._console_size()
        self._reboot(host, trigger)

    def _reboot(self, host: Remote, trigger: list[str]) -> None:
        """Run `trigger` detached on the box and wait until it stops answering."""
        host.run(["sh", "-c", bootonce.DETACHED, "sh", *trigger], deadline=Deadline.after(30))
        down = Deadline.after(self.config.deadlines.down)
        while self.probe(None):
            if down.expired:
                raise TargetStartFailed(f"the box still answers SSH {self.config.deadlines.down:.0f}s after "
                                        f"`{shlex.join(trigger)}`: it did not reboot")
            time.sleep(POLL)

    def link_alive(self, host: Remote) -> bool:
        """The box is the host: once its kernel stops answering SSH, its BMC (reached over the
        network as the box was) answering with the power on says the way there is fine and the
        silence is the kernel's."""
        try:
            return self.power.status(Deadline.after(15)) == "on"
        except Exception:  # noqa: BLE001 - the BMC does not answer either: the link or the lab
            return False

    def alive(self, host: Remote, deadline: Deadline) -> bool:
        return self.power.status(deadline) == "on"

    def wait_off(self, host: Remote, seconds: float) -> bool:
        return False  # a box does not power itself off as a reproducer (probes() refuses it)

    def fetch_console(self, host: Remote, local: Path, deadline: Deadline) -> None:
        c = self.config.console
        if c.kind == "file":
            data = Path(c.path).read_bytes()
            mark = self._console_mark if self._console_mark <= len(data) else 0  # a power cycle may truncate it
            cut = self._console_cut if self._console_cut is not None and mark <= self._console_cut else len(data)
            text = data[mark:cut].decode("utf-8", "replace")
            if cut < len(data):  # the default kernel's boot after our power cycle: not the candidate's doing
                write_text_masked(local.with_name("console-after-power-cycle.log"),
                                  data[cut:].decode("utf-8", "replace"))
        elif c.kind == "pstore":
            with self.login(None, deadline.sub(30)) as box:
                res = box.run(["sh", "-c", 'for f in /sys/fs/pstore/*; do [ -f "$f" ] || continue; '
                               'echo "=== $f"; cat "$f"; rm -f "$f"; done'], deadline=deadline.sub(60))
                text = res.stdout
        else:
            text = "(the inventory names no console for this box: console.kind none)\n"
        write_text_masked(local, text)
        if self._notes:
            write_text_masked(local.with_name("recovery.log"), "\n".join(self._notes) + "\n")

    # --- recovery ------------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        if text:
            log.info("%s: %s", self.host_cfg.name, text)
            self._notes.append(f"{time.strftime('%H:%M:%S')} {text}")

    def _console_size(self) -> int:
        if self.config.console.kind != "file":
            return 0
        try:
            return Path(self.config.console.path).stat().st_size
        except OSError:
            return 0

    def _console_settles(self, seconds: float) -> None:
        """After an NMI: wait (up to `seconds`) until the console stops growing, so what the
        kernel prints is in it before the power cycle."""
        end = Deadline.after(seconds)
        last, quiet_since = self._console_size(), None  # quiet only counts once the kernel printed
        while not end.expired:
            time.sleep(POLL)
            now = self._console_size()
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif quiet_since is not None and time.monotonic() - quiet_since > 2.0:
                return

    def _recover(self, why: str) -> str:
        """NMI → console → power cycle → the default kernel answers. Returns what was done;
        raises InfraError when the box did not come back (BoxNeedsHuman the n-th time in a row)."""
        d = self.config.deadlines
        self._note(f"recovering: {why}")
        try:
            self._note(self.power.nmi(Deadline.after(30)))
            self._console_settles(d.nmi)
        except PowerUnsupported as e:
            self._note(f"no NMI: {e}")
        except PowerAuthError:
            raise
        except PowerError as e:
            self._note(f"NMI failed: {e}")
        try:
            if self._console_cut is None:
                self._console_cut = self._console_size()
            self._note(self.power.cycle(Deadline.after(60)))
            box = self._wait_default(Deadline.after(d.recover))
            box.close()
        except (PowerError, NotBack) as e:
            n = _FAILED[self.host_cfg.name] = _FAILED.get(self.host_cfg.name, 0) + 1
            self._note(f"recovery failed ({n} in a row): {e}")
            if n >= self.config.recoveries:
                raise BoxNeedsHuman(
                    f"{self.host_cfg.name}: {n} recoveries in a row failed (last: {e}); the box needs a human: "
                    f"power it on into its default kernel {self.config.default_release}, then "
                    "`fleetbisect resume` the run") from None
            raise NotBack(f"recovery {n} of {self.config.recoveries} failed: {e}") from None
        _FAILED[self.host_cfg.name] = 0
        done = f"recovered by {self.power.describe()}: back on {self.config.default_release}"
        self._note(done)
        return done

    def _wait_default(self, deadline: Deadline) -> Remote:
        """The box answers SSH and runs its default kernel; a session on it."""
        while not self.probe(None):
            if deadline.expired:
                raise NotBack(f"no SSH from the box within {deadline.seconds:.0f}s")
            time.sleep(POLL)
        last: Exception | None = None
        while not deadline.expired:
            try:
                box = self.login(None, deadline.sub(30))
                break
            except RemoteError as e:
                last = e
                time.sleep(1.0)
        else:
            raise NotBack(f"the box's sshd answers but the login fails: {last}")
        running = self._running(box, deadline.sub(30))
        if running != self.config.default_release:
            box.close()
            raise NotBack(f"the box came back on {running!r}, not its default {self.config.default_release!r}: "
                          "its permanent default boot entry is not the known-good kernel")
        return box


def posixpath_base(path: str) -> str:
    """The blob name of a pushed artifact (its sha256, see stages/push.py)."""
    return path.rstrip("/").rsplit("/", 1)[-1]
