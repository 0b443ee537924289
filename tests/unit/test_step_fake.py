"""One step driven through the target seam with a fake target and fake remotes: the order of the
target's calls, faults turned into outcomes, retries, a lost lease. The build is real (git and a
shell command in a temporary tree); nothing else is."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fleetbisect.config.inventory import load_inventory
from fleetbisect.config.playbook import load_playbook
from fleetbisect.lease import LeaseLost
from fleetbisect.remote.fake import FakeRemote
from fleetbisect.step import Lab, run_step
from fleetbisect.targets import Target, TargetStartFailed
from fleetbisect.ui import UI
from fleetbisect.verdict import OutcomeKind, Verdict

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9 guest"
BUILD = ("mkdir -p include/config arch/x86/boot && echo 6.1.0$LOCALVERSION > include/config/kernel.release "
         "&& echo kernel > arch/x86/boot/bzImage")


class FakeTarget(Target):
    kind = "fake"

    def __init__(self, host_cfg, playbook, *, starts_ok=True, boots=True, guest=None):
        super().__init__(host_cfg, playbook)
        self.calls: list[str] = []
        self.starts_ok, self.boots, self.guest = starts_ok, boots, guest

    def stop(self, host, deadline):
        self.calls.append("stop")
        return ""

    def deploy(self, host, artifacts, step_dir, deadline):
        self.calls.append(f"deploy {sorted(artifacts)}")

    def start(self, host, artifacts, step_dir, deadline):
        self.calls.append("start")
        if not self.starts_ok:
            raise TargetStartFailed("the fake refuses to start")

    def alive(self, host, deadline):
        return self.boots

    def probe(self, host):
        return self.boots

    def login(self, host, deadline):
        self.calls.append("login")
        return self.guest

    def wait_off(self, host, seconds):
        return True

    def fetch_console(self, host, local, deadline):
        self.calls.append("console")
        local.write_text("[    0.000000] Linux version 6.1.0\n")


@pytest.fixture
def tree(tmp_path) -> tuple[Path, str]:
    tree = tmp_path / "tree"
    tree.mkdir()
    for args in (["init", "-q"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty",
                                  "-m", "one"]):
        subprocess.run(["git", "-C", str(tree), *args], check=True)
    sha = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    return tree, sha


@pytest.fixture
def configs(tmp_path):
    inv = tmp_path / "inv.yaml"
    inv.write_text(f"hosts:\n  box:\n    ssh: {{address: 127.0.0.1}}\n    target:\n      kind: qemu\n"
                   f"      guest: {{port: 10022, host_key: '{KEY}'}}\n")
    pb = tmp_path / "pb.yaml"
    pb.write_text(f"name: t\nbuild: {{command: '{BUILD}'}}\nverify: {{command: cat /release}}\n"
                  "reproducer: {kind: command, command: stress, timeout: 10s}\npolicy: {retries: 1}\n")
    return load_inventory([inv]).host("box"), load_playbook(pb)


def lab_with(tree, configs, target_kw=None, lease=None):
    host_cfg, playbook = configs
    made: list[FakeTarget] = []

    def make_target(cfg, pb):
        made.append(FakeTarget(cfg, pb, **(target_kw or {})))
        return made[-1]

    lab = Lab(tree, host_cfg, playbook, UI(quiet=True), lease=lease,
              connect=lambda cfg, deadline: FakeRemote("host"), make_target=make_target)
    return lab, made


def guest_for(release: str, exit_status: int = 0) -> FakeRemote:
    guest = FakeRemote("guest")
    guest.on("cat /release", stdout=release + "\n")
    guest.on("stress", exit_status=exit_status, stdout="done\n")
    return guest


def test_a_step_drives_the_target_in_order_and_passes(tree, configs, tmp_path):
    path, sha = tree
    lab, made = lab_with(path, configs, {"guest": guest_for(f"6.1.0-fb{sha[:12]}")})
    rec = run_step(lab, 1, sha, "one", tmp_path / "run" / "steps" / "001")
    assert rec.verdict is Verdict.GOOD, rec.reason
    (target,) = made
    assert target.calls == ["stop", "deploy ['kernel']", "start", "login", "stop", "console"]
    assert (tmp_path / "run" / "steps" / "001" / "console.log").exists()


def test_a_failing_reproducer_is_bad(tree, configs, tmp_path):
    path, sha = tree
    lab, _ = lab_with(path, configs, {"guest": guest_for(f"6.1.0-fb{sha[:12]}", exit_status=1)})
    assert run_step(lab, 1, sha, "one", tmp_path / "run" / "steps" / "001").verdict is Verdict.BAD


def test_the_wrong_kernel_is_a_skip(tree, configs, tmp_path):
    path, sha = tree
    lab, _ = lab_with(path, configs, {"guest": guest_for("6.1.0-fb000000000000")})
    rec = run_step(lab, 1, sha, "one", tmp_path / "run" / "steps" / "001")
    assert rec.verdict is Verdict.SKIP and rec.outcomes[0].kind is OutcomeKind.WRONG_KERNEL


def test_a_target_that_dies_before_the_guest_answers_is_a_boot_failure(tree, configs, tmp_path):
    path, sha = tree
    lab, made = lab_with(path, configs, {"boots": False})
    rec = run_step(lab, 1, sha, "one", tmp_path / "run" / "steps" / "001")
    assert rec.verdict is Verdict.SKIP and rec.outcomes[0].kind is OutcomeKind.BOOT_FAILED
    assert "login" not in made[0].calls


def test_a_target_that_will_not_start_is_retried_then_aborts(tree, configs, tmp_path, monkeypatch):
    import fleetbisect.step as step

    monkeypatch.setattr(step, "RETRY_PAUSE", 0)
    path, sha = tree
    lab, made = lab_with(path, configs, {"starts_ok": False})
    rec = run_step(lab, 1, sha, "one", tmp_path / "run" / "steps" / "001")
    assert rec.verdict is Verdict.ABORT and "refuses to start" in rec.reason
    assert rec.attempts == 2 and len(made) == 2  # retries: 1, and never a verdict


class LeaseLostAfter:
    """A lease that is held for the first `n` stage starts, then lost (a renewal failed)."""

    def __init__(self, n: int):
        self.n, self.lost = n, None

    def check(self):
        self.n -= 1
        if self.n < 0:
            self.lost = "lost the lease on box: renewal failed"
        if self.lost:
            raise LeaseLost(self.lost)


def test_a_lost_lease_stops_the_step_and_leaves_the_vm_alone(tree, configs, tmp_path):
    path, sha = tree
    # held for build and the push, lost before the boot (which stops the old VM first)
    lab, made = lab_with(path, configs, {"guest": guest_for(f"6.1.0-fb{sha[:12]}")}, lease=LeaseLostAfter(2))
    with pytest.raises(LeaseLost):
        run_step(lab, 1, sha, "one", tmp_path / "run" / "steps" / "001")
    (target,) = made  # raised, not retried as an infrastructure fault
    assert target.calls == ["console"]  # no stop at all: the VM may be another's now


class SlowStopTarget(FakeTarget):
    """A VM whose stop takes until the test lets it go (shared log of every target's calls)."""

    log: list[str] = []
    release = None

    def stop(self, host, deadline):
        self.log.append("stop begins")
        if "start" in self.log:  # a VM runs: its stop takes until the test lets it go
            self.release.wait(30)
        self.log.append("stop ends")
        return ""

    def start(self, host, artifacts, step_dir, deadline):
        self.log.append("start")


def test_background_cleanup_stops_the_vm_while_the_run_goes_on_and_before_the_next_boot(
        tree, configs, tmp_path):
    import threading

    path, sha = tree
    host_cfg, playbook = configs
    SlowStopTarget.log, SlowStopTarget.release = [], threading.Event()
    hosts: list[FakeRemote] = []

    def connect(cfg, deadline):
        hosts.append(FakeRemote("host"))
        return hosts[-1]

    lab = Lab(path, host_cfg, playbook, UI(quiet=True), background_cleanup=True, connect=connect,
              make_target=lambda cfg, pb: SlowStopTarget(cfg, pb, guest=guest_for(f"6.1.0-fb{sha[:12]}")))
    rec = run_step(lab, 1, sha, "one", tmp_path / "run" / "steps" / "001")
    assert rec.verdict is Verdict.GOOD, rec.reason
    # the step was judged (its console fetched) with the VM's stop handed to the background,
    # where it still waits
    assert (tmp_path / "run" / "steps" / "001" / "console.log").exists()
    assert lab.pending is not None and not lab.pending.done
    assert SlowStopTarget.log == ["stop begins", "stop ends", "start", "stop begins"]
    threading.Timer(0.2, SlowStopTarget.release.set).start()  # the stop finishes later
    rec2 = run_step(lab, 2, sha, "one", tmp_path / "run" / "steps" / "002")
    assert rec2.verdict is Verdict.GOOD
    # the next boot waited for the previous VM's stop to finish, and only then started one;
    # that clean stop is why the boot did not look for a leftover VM again
    assert SlowStopTarget.log[3:6] == ["stop begins", "stop ends", "start"]
    assert hosts[0].closed  # the first attempt's connection was closed by the background stop
    lab.settle()
    assert lab.pending is None and hosts[1].closed


def test_a_failed_background_stop_is_a_warning_at_settle(tree, configs, tmp_path):
    path, sha = tree
    warnings = []

    class Failing(FakeTarget):
        stops = 0

        def stop(self, host, deadline):
            Failing.stops += 1
            if Failing.stops == 2:  # the first step's background stop
                raise OSError("host went away")
            return ""

    host_cfg, playbook = configs
    ui = UI(quiet=True)
    ui.warn = warnings.append
    lab = Lab(path, host_cfg, playbook, ui, background_cleanup=True,
              connect=lambda cfg, deadline: FakeRemote("host"),
              make_target=lambda cfg, pb: Failing(cfg, pb, guest=guest_for(f"6.1.0-fb{sha[:12]}")))
    assert run_step(lab, 1, sha, "one", tmp_path / "s").verdict is Verdict.GOOD
    assert run_step(lab, 2, sha, "one", tmp_path / "s2").verdict is Verdict.GOOD
    assert any("host went away" in w for w in warnings), warnings
    lab.settle()
    # that stop failed, so the next boot looked for a VM left running before starting its own:
    # 4 stops = step 1's boot and background, step 2's boot and background
    assert Failing.stops == 4
