"""Bare-metal logic without a box: the one-shot entry in grub.cfg, install names, the custom
command's placeholders, the install script (run for real by sh in a temporary /boot), and the
recovery counter that stops a run once the box needs a human."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fleetbisect.config.baremetal import BaremetalConfig
from fleetbisect.errors import RunAborted, UserError
from fleetbisect.power.base import Power, PowerUnsupported
from fleetbisect.targets import baremetal, bootonce

UUID = "1b2c3d4e-0000-4000-8000-000000000001"
GRUB_CFG = f"""
### BEGIN /etc/grub.d/10_linux ###
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-{UUID}' {{
	linux	/boot/vmlinuz-6.1.0-21-amd64 root=UUID={UUID} ro quiet
	initrd	/boot/initrd.img-6.1.0-21-amd64
}}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-{UUID}' {{
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-fbabc' --class debian $menuentry_id_option 'gnulinux-6.1.0-fbabc-advanced-{UUID}' {{
		if [ x$feature_all_video_module = xy ]; then
		  insmod all_video
		fi
		linux	/boot/vmlinuz-6.1.0-fbabc root=UUID={UUID} ro quiet
	}}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-fbabc (recovery mode)' $menuentry_id_option 'gnulinux-6.1.0-fbabc-recovery-{UUID}' {{
		linux	/boot/vmlinuz-6.1.0-fbabc root=UUID={UUID} ro single
	}}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-21-amd64' $menuentry_id_option 'gnulinux-6.1.0-21-amd64-advanced-{UUID}' {{
		linux	/boot/vmlinuz-6.1.0-21-amd64 root=UUID={UUID} ro quiet
	}}
}}
menuentry 'Top-level test' $menuentry_id_option 'top-test' {{
	linux /vmlinuz-top ro
}}
"""


def test_grub_entry_names_the_submenu_and_the_entry_never_the_recovery_one():
    assert bootonce.grub_entry(GRUB_CFG, "vmlinuz-6.1.0-fbabc") == \
        f"gnulinux-advanced-{UUID}>gnulinux-6.1.0-fbabc-advanced-{UUID}"
    assert bootonce.grub_entry(GRUB_CFG, "vmlinuz-top") == "top-test"  # after the submenu closed
    assert bootonce.grub_entry(GRUB_CFG, "vmlinuz-6.1.0-21-amd64") == f"gnulinux-simple-{UUID}"
    with pytest.raises(UserError, match="no entry booting vmlinuz-6.1.0-fbzzz"):
        bootonce.grub_entry(GRUB_CFG, "vmlinuz-6.1.0-fbzzz")


def test_install_name_carries_the_release_and_is_a_safe_file_name():
    assert bootonce.install_name("6.1.0-lab-fb0123456789ab") == "6.1.0-lab-fb0123456789ab"
    assert bootonce.install_name("6.1.0 evil/../x") == "6.1.0_evil_.._x"
    assert bootonce.install_name(None, "ab" * 32) == "fleetbisect-" + "ab" * 8


def test_custom_command_fills_placeholders_word_by_word():
    argv = bootonce.command_argv(["bootonce", "--kernel={kernel}", "{cmdline}", "{release}"],
                                 kernel="/boot/vmlinuz-r", initrd=None, cmdline="console=ttyS0 quiet", release="r")
    assert argv == ["bootonce", "--kernel=/boot/vmlinuz-r", "console=ttyS0 quiet", "r"]


def install(tmp_path: Path, name: str, env=None) -> subprocess.CompletedProcess:
    kernel = tmp_path / f"k-{name}"
    kernel.write_bytes(b"k" * 4096)
    return subprocess.run(["sh", "-c", bootonce.INSTALL, "sh", str(tmp_path / "boot"), name,
                           str(tmp_path / "work" / "installed"), str(kernel), "", ""],
                          capture_output=True, text=True, env=env)


def test_install_removes_older_test_kernels_and_nothing_else(tmp_path):
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "vmlinuz-6.1.0-21-amd64").write_text("the default kernel")
    assert install(tmp_path, "r1").returncode == 0
    second = install(tmp_path, "r2")
    assert second.returncode == 0, second.stderr
    assert "removed r1" in second.stdout
    assert sorted(p.name for p in (tmp_path / "boot").iterdir()) == ["vmlinuz-6.1.0-21-amd64", "vmlinuz-r2"]
    assert (tmp_path / "work" / "installed").read_text().split() == ["r2"]


def test_install_refuses_when_boot_has_no_room(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "df").write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted'\n"
                             "echo '/dev/sda1 500000 499990 10 100% /boot'\n")
    (fake / "df").chmod(0o755)
    res = install(tmp_path, "r1", env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}"))
    assert res.returncode == 4
    assert "no room in" in res.stderr and "10 KiB free" in res.stderr


class FakePower(Power):
    kind = "fake"

    def __init__(self, nmi=True):
        super().__init__(None)
        self.calls: list[str] = []
        self.has_nmi = nmi

    def describe(self) -> str:
        return "fake BMC"

    def status(self, deadline) -> str:
        return "on"

    def cycle(self, deadline) -> str:
        self.calls.append("cycle")
        return "power cycled"

    def nmi(self, deadline) -> str:
        self.calls.append("nmi")
        if not self.has_nmi:
            raise PowerUnsupported("no NMI here")
        return "NMI sent"


class Host:
    name = "box1"
    work_dir = "/var/tmp/fb"

    def __init__(self):
        self.target = BaremetalConfig(kind="baremetal", default_release="good",
                                      power={"kind": "command", "status": ["true"], "cycle": ["true"]},
                                      deadlines={"nmi": 0.1, "answer": 0.1, "recover": 1})


class Playbook:
    class verify:  # noqa: N801 - stands in for the playbook's section
        command = "cat /etc/release"


def box(comes_back, nmi=True):
    target = baremetal.Baremetal(Host(), Playbook())
    target.power = FakePower(nmi)
    outcomes = iter(comes_back)

    def wait_default(deadline):
        if not next(outcomes):
            raise baremetal.NotBack("no SSH from the box within 1s")

        class Session:
            def close(self):
                pass
        return Session()

    target._wait_default = wait_default
    return target


def test_three_failed_recoveries_in_a_row_stop_the_run(monkeypatch):
    monkeypatch.setattr(baremetal, "_FAILED", {})
    target = box([False, True, False, False, False], nmi=False)
    with pytest.raises(baremetal.NotBack, match="recovery 1 of 3"):
        target._recover("the box did not answer")
    assert "recovered" in target._recover("again")  # a success resets the count
    for n in (1, 2):
        with pytest.raises(baremetal.NotBack, match=f"recovery {n} of 3"):
            target._recover("hung")
    with pytest.raises(baremetal.BoxNeedsHuman, match="3 recoveries in a row failed.*needs a human") as e:
        target._recover("hung")
    assert isinstance(e.value, RunAborted)  # the run stops, it does not retry or skip on
    assert target.power.calls == ["nmi", "cycle"] * 5  # an NMI first every time, even where unsupported
    assert "no NMI: no NMI here" in "\n".join(target._notes)


def test_recovery_sends_an_nmi_before_the_power_cycle(monkeypatch):
    monkeypatch.setattr(baremetal, "_FAILED", {})
    target = box([True])
    assert target._recover("no SSH").startswith("recovered by fake BMC")
    assert target.power.calls == ["nmi", "cycle"]
    notes = "\n".join(target._notes)
    assert notes.index("NMI sent") < notes.index("power cycled") < notes.index("recovered")


def test_start_loads_the_installed_kernel_with_kexec_and_reboots_detached(tmp_path, monkeypatch):
    from fleetbisect.deadline import Deadline
    from fleetbisect.remote.fake import FakeRemote

    target = baremetal.Baremetal(Host(), Playbook())
    Playbook.boot = type("boot", (), {"cmdline": "console=ttyS0 panic=-1"})
    answers = iter([True, True, False])  # still up twice after the trigger, then down
    monkeypatch.setattr(target, "probe", lambda host: next(answers))
    host = FakeRemote("box")
    target.installed = ("/boot/vmlinuz-r1", "/boot/initrd.img-r1")
    target.start(host, {}, tmp_path, Deadline.after(30))
    commands = [c.command for c in host.calls]
    assert commands[0] == "kexec -l /boot/vmlinuz-r1 --initrd=/boot/initrd.img-r1 '--command-line=console=ttyS0 panic=-1'"
    assert "sleep 1; exec" in commands[1] and commands[1].endswith("kexec -e")
    assert (tmp_path / "commands.txt").read_text().splitlines()[-1] == "kexec -e"


def test_a_box_that_never_goes_down_is_a_start_failure_not_a_verdict(tmp_path, monkeypatch):
    from fleetbisect.deadline import Deadline
    from fleetbisect.remote.fake import FakeRemote
    from fleetbisect.targets.base import TargetStartFailed

    host_cfg = Host()
    host_cfg.target = host_cfg.target.model_copy(update={"deadlines": host_cfg.target.deadlines.model_copy(
        update={"down": 0.5})})
    target = baremetal.Baremetal(host_cfg, Playbook())
    Playbook.boot = type("boot", (), {"cmdline": "quiet"})
    monkeypatch.setattr(target, "probe", lambda host: True)
    target.installed = ("/boot/vmlinuz-r1", None)
    with pytest.raises(TargetStartFailed, match="still answers SSH .* it did not reboot"):
        target.start(FakeRemote("box"), {}, tmp_path, Deadline.after(30))


def test_the_console_of_a_step_stops_where_our_power_cycle_began(tmp_path, monkeypatch):
    from fleetbisect.deadline import Deadline

    monkeypatch.setattr(baremetal, "_FAILED", {})
    log = tmp_path / "serial.log"
    log.write_text("earlier step\n")
    host_cfg = Host()
    host_cfg.target = BaremetalConfig.model_validate({**host_cfg.target.model_dump(),
                                                      "console": {"kind": "file", "path": str(log)}})
    target = baremetal.Baremetal(host_cfg, Playbook())
    target.power = FakePower()
    target._wait_default = lambda deadline: type("S", (), {"close": lambda self: None})()
    with log.open("a") as f:
        f.write("Kernel panic - not syncing: hung\nNMI backtrace\n")
    target._recover("no SSH")
    with log.open("a") as f:
        f.write("Linux version 6.1 (the default kernel again)\n")
    (tmp_path / "step").mkdir()
    target.fetch_console(None, tmp_path / "step" / "console.log", Deadline.after(5))
    assert (tmp_path / "step" / "console.log").read_text() == "Kernel panic - not syncing: hung\nNMI backtrace\n"
    assert "the default kernel again" in (tmp_path / "step" / "console-after-power-cycle.log").read_text()
    assert "recovered by fake BMC" in (tmp_path / "step" / "recovery.log").read_text()


class Session:
    def __init__(self, runs: str):
        self.runs = runs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def close(self):
        pass


def test_stop_reboots_a_box_left_on_a_candidate_and_power_cycles_one_that_hangs(monkeypatch):
    from fleetbisect.deadline import Deadline
    from fleetbisect.targets.base import TargetStartFailed

    monkeypatch.setattr(baremetal, "_FAILED", {})
    target = baremetal.Baremetal(Host(), Playbook())
    target.power = FakePower()
    reboots = []
    monkeypatch.setattr(target, "_answers", lambda seconds: True)
    monkeypatch.setattr(target, "login", lambda host, deadline: Session(target.runs))
    monkeypatch.setattr(target, "_running", lambda box, deadline: box.runs)
    monkeypatch.setattr(target, "_wait_default", lambda deadline: Session("good"))
    monkeypatch.setattr(target, "_reboot", lambda box, trigger: reboots.append(trigger))

    target.runs = "good"
    assert target.stop(None, Deadline.after(5)) == "" and reboots == []  # already on its default
    target.runs = "6.1.0-fbabc"
    assert target.stop(None, Deadline.after(5)) == "rebooted from 6.1.0-fbabc into its known-good good"
    assert reboots == [["reboot"]] and target.power.calls == []  # a plain reboot, no BMC

    def hangs(box, trigger):
        raise TargetStartFailed("the box still answers SSH 60s after `reboot`: it did not reboot")

    monkeypatch.setattr(target, "_reboot", hangs)
    assert target.stop(None, Deadline.after(5)).startswith("recovered by fake BMC")
    assert target.power.calls == ["nmi", "cycle"]
