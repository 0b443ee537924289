"""The fleet (several hosts, a search of its own) driven end to end with fake hosts and targets:
real git, a real build command, real journal and report; the SSH hosts and VMs are fakes.
Each fake guest fails its reproducer when the commit under test contains the culprit (always,
or on a random share of boots for the flaky case)."""

from __future__ import annotations

import hashlib
import json
import posixpath
import random
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

import fleetbisect.executor as executor_mod
import fleetbisect.run as run_mod
import fleetbisect.step as step_mod
import fleetbisect.targets as targets_mod
from fleetbisect.config.inventory import load_inventory
from fleetbisect.config.playbook import load_playbook
from fleetbisect.journal import read, replay
from fleetbisect.remote.base import RemoteError, Result
from fleetbisect.remote.fake import FakeRemote
from fleetbisect.report import status
from fleetbisect.run import resume_run, start_run
from fleetbisect.targets import Target, TargetStartFailed
from fleetbisect.ui import UI

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9 guest"
# The "kernel" is the commit id, so the fake target knows which commit it boots.
BUILD = ("mkdir -p include/config arch/x86/boot && echo 6.1.0$LOCALVERSION > include/config/kernel.release "
         "&& git rev-parse HEAD > arch/x86/boot/bzImage")
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def make_repo(path: Path, n: int, culprit: int) -> list[str]:
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    for i in range(n):
        if i == culprit:
            (path / "bug").write_text("regressed\n")
        subprocess.run([*GIT, "-C", str(path), "commit", "-q", "--allow-empty", "-a", "-m", f"c{i}"]
                       if i != culprit else [*GIT, "-C", str(path), "add", "bug"], check=True)
        if i == culprit:
            subprocess.run([*GIT, "-C", str(path), "commit", "-q", "-m", f"c{i}"], check=True)
    return subprocess.run(["git", "-C", str(path), "rev-list", "--reverse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.split()


class FakeHost(FakeRemote):
    """One per host for the whole test; knows each pushed blob by its sha256 (push's name for it)."""

    blobs: dict

    def put(self, local, remote_path, **kw):
        data = Path(local).read_bytes()
        self.__dict__.setdefault("blobs", {})[hashlib.sha256(data).hexdigest()] = data
        return super().put(local, remote_path, **kw)

    def close(self) -> None:
        pass


class World:
    """Fake hosts: which commit each boots, whether its reproducer fails."""

    def __init__(self, shas: list[str], culprit: int, hit_rate: float = 1.0, broken: tuple[str, ...] = ()):
        self.bad = set(shas[culprit:])
        self.hit_rate, self.broken = hit_rate, broken
        self.rng = random.Random(7)
        self.hosts: dict[str, FakeHost] = {}
        self.boots: list[tuple[str, str]] = []  # (host, commit)
        self.slow: str | None = None  # this host's reproducer runs until its VM is stopped (or 5 s)
        self.vm_off: dict[str, threading.Event] = {}
        self.cut_short = 0  # reproducer runs ended by a stopped VM
        self.slow_busy = threading.Event()  # the slow host's reproducer is running

    def connect(self, cfg, deadline):
        return self.hosts.setdefault(cfg.name, FakeHost(cfg.name))

    def target(self, cfg, playbook):
        world = self

        class FakeTarget(Target):
            kind = "fake"

            def stop(self, host, deadline):
                if cfg.name in world.vm_off:
                    world.vm_off[cfg.name].set()
                return ""

            def deploy(self, host, artifacts, step_dir, deadline):
                self.sha = host.blobs[posixpath.basename(artifacts["kernel"])].decode().strip()

            def start(self, host, artifacts, step_dir, deadline):
                if cfg.name in world.broken:
                    raise TargetStartFailed(f"{cfg.name}: the fake refuses to start")
                world.boots.append((cfg.name, self.sha))
                world.vm_off[cfg.name] = threading.Event()

            def alive(self, host, deadline):
                return True

            def probe(self, host):
                return True

            def login(self, host, deadline):
                guest = FakeRemote("guest")
                guest.on("cat /release", stdout=f"6.1.0-fb{self.sha[:12]}\n")
                fails = self.sha in world.bad and world.rng.random() < world.hit_rate
                guest.on("stress", exit_status=1 if fails else 0, stdout="done\n")
                if world.slow and cfg.name != world.slow:  # the others answer once the slow one is busy
                    def after_slow(call):
                        world.slow_busy.wait(5)
                        return Result(call.command, 1 if fails else 0, "done\n", "", 0.0)
                    guest.on("stress", after_slow)
                if cfg.name == world.slow:
                    off = world.vm_off[cfg.name]

                    def slow(call):
                        world.slow_busy.set()
                        if off.wait(5):
                            world.cut_short += 1
                            raise RemoteError("guest", "connection lost: the VM was stopped")
                        return Result(call.command, 1 if fails else 0, "done\n", "", 5.0)
                    guest.on("stress", slow)
                return guest

            def wait_off(self, host, seconds):
                return True

            def fetch_console(self, host, local, deadline):
                local.write_text("[    0.000000] Linux version 6.1.0\n")

        return FakeTarget(cfg, playbook)


class Keeper:
    lost = None

    def check(self):
        pass


@contextmanager
def fake_lease(host_cfg, run_id, retries, ui, token=None, on_renewed=None):  # run.leased's shape
    yield Keeper()


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    def setup(n=24, culprit=13, hit_rate=1.0, broken=(), policy="{retries: 0}", slots=1):
        shas = make_repo(tmp_path / "repo", n, culprit)
        world = World(shas, culprit, hit_rate, broken)
        monkeypatch.setattr(step_mod, "connect_host", world.connect)
        monkeypatch.setattr(executor_mod, "connect_host", world.connect)
        monkeypatch.setattr(targets_mod, "for_host", world.target)
        monkeypatch.setattr(run_mod, "leased", fake_lease)
        monkeypatch.setattr(step_mod, "RETRY_PAUSE", 0)
        inv = tmp_path / "inv.yaml"
        inv.write_text("hosts:\n" + "".join(
            f"  {h}:\n    ssh: {{address: 127.0.0.1}}\n    slots: {slots if h == 'a' else 1}\n    target:\n      kind: qemu\n"
            f"      guest: {{port: 10022, host_key: '{KEY}'}}\n" for h in "abc")
            + "groups:\n  rack1: [a, b, c]\n")
        pb = tmp_path / "pb.yaml"
        pb.write_text(f"name: t\nbuild: {{command: '{BUILD}'}}\nverify: {{command: cat /release}}\n"
                      f"reproducer: {{kind: command, command: stress, timeout: 10s}}\npolicy: {policy}\n")
        return shas, world, load_inventory([inv]), inv, load_playbook(pb), pb
    return setup


def run(tmp_path, shas, inventory, inv, playbook, pb, hosts, **kw):
    return start_run(repo=tmp_path / "repo", good=shas[0], bad=shas[-1], host=hosts[0], hosts=hosts,
                     inventory=[inv], playbook=playbook, playbook_path=pb, run_dir=tmp_path / "run",
                     ui=UI(quiet=True), **kw)


def test_three_hosts_find_the_culprit_and_the_journal_says_who_ran_what(tmp_path, fleet):
    shas, world, inventory, inv, playbook, pb = fleet()
    report = run(tmp_path, shas, inventory, inv, playbook, pb, inventory.group("rack1"))
    assert report.status == "found" and report.culprit == shas[13], report.message
    assert report.confirmed is True
    events, _ = read(tmp_path / "run")
    started = [e for e in events if e["event"] == "step-started"]
    assert all(e["host"] in "abc" for e in started)
    assert {e["host"] for e in started} == {"a", "b", "c"}  # every host worked
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    assert data["search"] == "kary" and all(s["host"] in "abc" for s in data["steps"])
    # The search's log replays in git to the same answer.
    wt = tmp_path / "replay"
    subprocess.run(["git", "-C", str(tmp_path / "repo"), "worktree", "add", "-q", "--detach", str(wt)], check=True)
    out = subprocess.run(["git", "-C", str(wt), "bisect", "replay", str(tmp_path / "run" / "bisect.log")],
                         capture_output=True, text=True)
    assert f"{shas[13]} is the first bad commit" in out.stdout, out.stdout + out.stderr
    assert "a:" in status(tmp_path / "run") and "c:" in status(tmp_path / "run")


def test_three_hosts_need_fewer_rounds_than_one(tmp_path, fleet):
    shas, world, inventory, inv, playbook, pb = fleet(n=64, culprit=40, policy="{retries: 0, confirm: 0}")
    asked: list[list[str]] = []
    report = run(tmp_path, shas, inventory, inv, playbook, pb, inventory.group("rack1"),
                 check_endpoints=False, build_ahead=asked.append)
    assert report.culprit == shas[40]
    # The builder hook heard which commits may come next, and the search did ask for some of them.
    assert asked and {c for _, c in world.boots} & {c for batch in asked for c in batch}
    per_host = {h: sum(1 for b in world.boots if b[0] == h) for h in "abc"}
    # 63 candidates: git's bisect needs 6 steps on one host; three hosts each do at most 4 (log4 64 = 3, +1)
    assert max(per_host.values()) <= 4 and sum(per_host.values()) >= 6, per_host


def test_a_host_that_keeps_failing_is_set_aside_and_the_run_goes_on(tmp_path, fleet):
    shas, world, inventory, inv, playbook, pb = fleet(broken=("b",))
    report = run(tmp_path, shas, inventory, inv, playbook, pb, inventory.group("rack1"))
    assert report.status == "found" and report.culprit == shas[13], report.message
    assert "b" in report.set_aside and "refuses to start" in report.set_aside["b"]
    assert not any(h == "b" for h, _ in world.boots)
    assert "b: 2 steps done; set aside: 2 steps in a row failed" in status(tmp_path / "run")


def test_a_flaky_reproducer_is_calibrated_and_the_answer_has_a_confidence(tmp_path, fleet):
    shas, world, inventory, inv, playbook, pb = fleet(n=16, culprit=9, hit_rate=0.5,
                                                      policy="{retries: 0, flaky: true, calibrate: 8}")
    report = run(tmp_path, shas, inventory, inv, playbook, pb, inventory.group("rack1"))
    assert report.search == "bayes"
    assert report.status == "found" and report.culprit == shas[9], report.message
    cal = report.calibration
    assert cal["runs"] == 8 and cal["good_runs"] == 4 and 0 < cal["hit_rate"] < 1 and cal["low"] < cal["high"]
    assert report.search_answer["confidence"] >= 0.99 and report.search_answer["runs"] > 0
    assert report.search_answer["runner_up"] in shas
    md = (tmp_path / "run" / "report.md").read_text()
    assert "hit rate on the bad end" in md and "confidence" in md


def test_a_flaky_good_end_stops_the_run(tmp_path, fleet):
    shas, world, inventory, inv, playbook, pb = fleet(n=12, culprit=0 + 1, hit_rate=0.5,
                                                      policy="{retries: 0, flaky: true, calibrate: 4}")
    world.bad.add(shas[0])  # the "good" end fails too
    report = run(tmp_path, shas, inventory, inv, playbook, pb, inventory.group("rack1"))
    assert report.status == "endpoint-failed" and "good end" in report.message


def test_resume_of_a_fleet_run_replays_the_search_and_retests_nothing_decided(tmp_path, fleet):
    shas, world, inventory, inv, playbook, pb = fleet(n=64, culprit=40, policy="{retries: 0, confirm: 0}")
    hosts = inventory.group("rack1")
    first = run(tmp_path, shas, inventory, inv, playbook, pb, hosts, check_endpoints=False)
    assert first.culprit == shas[40]
    # The controller "died" after its third result: cut the journal there.
    journal = tmp_path / "run" / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    finished = [i for i, ln in enumerate(lines) if '"event":"step-finished"' in ln]
    journal.write_text("".join(lines[:finished[2] + 1]))
    before = replay(read(tmp_path / "run")[0])
    tested = {r["commit"] for r in before.steps}
    world.boots.clear()
    report = resume_run(tmp_path / "run", UI(quiet=True))
    assert report.status == "found" and report.culprit == shas[40]
    assert not tested & {c for _, c in world.boots}  # nothing decided was tested again
    assert len(report.steps) >= 4


def test_a_test_that_no_longer_matters_is_cancelled_its_vm_stopped_and_the_host_reused(tmp_path, fleet):
    shas, world, inventory, inv, playbook, pb = fleet(n=64, culprit=5, policy="{retries: 0, confirm: 0}")
    world.slow = "c"  # c's reproducer takes "forever": a, b's results make its commit pointless first
    report = run(tmp_path, shas, inventory, inv, playbook, pb, inventory.group("rack1"), check_endpoints=False)
    assert report.status == "found" and report.culprit == shas[5], report.message
    events, _ = read(tmp_path / "run")
    cancelled = [e for e in events if e["event"] == "step-cancelled"]
    assert any(e["host"] == "c" for e in cancelled)
    assert world.cut_short >= 1  # the VM was stopped under the running reproducer
    again = [e for e in events if e["event"] == "step-started" and e["host"] == "c"]
    assert len(again) > 1  # the host got other work after a cancel
    # A cancelled step is never a result: the search got one result per finished step, no more.
    finished = [e for e in events if e["event"] == "step-finished"]
    assert not {e["index"] for e in cancelled} & {e["record"]["index"] for e in finished}
    assert len([e for e in events if e["event"] == "observed"]) == len(finished)


def test_run_on_an_inventory_group_from_the_command_line(tmp_path, fleet, capsys):
    from fleetbisect.cli import main

    shas, world, inventory, inv, playbook, pb = fleet(n=12, culprit=7)
    argv = ["run", "--inventory", str(inv), "--playbook", str(pb), "--repo", str(tmp_path / "repo"),
            "--good", shas[0], "--bad", shas[-1]]
    assert main([*argv, "--group", "rack9", "--run-dir", str(tmp_path / "r0")]) == 2
    assert "unknown group 'rack9' (the inventory has: rack1)" in capsys.readouterr().err
    assert main([*argv, "--host", "a", "--host", "b", "--search", "bisect", "--run-dir", str(tmp_path / "r1")]) == 2
    assert "use --search kary" in capsys.readouterr().err
    assert main([*argv, "--group", "rack1", "--host", "a", "--run-dir", str(tmp_path / "r2")]) == 0
    assert f"first bad commit: {shas[7]}" in capsys.readouterr().out
    spec = read(tmp_path / "r2")[0][0]["config"]
    assert spec["hosts"] == ["a", "b", "c"] and spec["search"] == "kary"  # --host a once, not twice


def test_one_host_and_a_deterministic_reproducer_is_gits_own_bisect(tmp_path, fleet):
    shas, world, inventory, inv, playbook, pb = fleet(n=20, culprit=11)
    report = run(tmp_path, shas, inventory, inv, playbook, pb, [inventory.host("a")])
    assert report.status == "found" and report.culprit == shas[11] and report.confirmed is True
    assert report.search == "bisect"
    log = (tmp_path / "run" / "bisect.log").read_text()
    assert "git bisect start" in log and f"# first bad commit: [{shas[11]}]" in log  # git's own log
    events, _ = read(tmp_path / "run")
    assert [e["event"] for e in events].count("marked") >= 4


def test_one_host_with_two_slots_tests_two_commits_at_once_and_resumes(tmp_path, fleet, capsys, monkeypatch):
    from fleetbisect.cli import main

    shas, world, inventory, inv, playbook, pb = fleet(n=40, culprit=23, slots=2)
    trees, make_tree = [], executor_mod.Executor._worktree
    monkeypatch.setattr(executor_mod.Executor, "_worktree", lambda ex: (trees.append(str(ex.tree)), make_tree(ex)))
    argv = ["run", "--inventory", str(inv), "--playbook", str(pb), "--repo", str(tmp_path / "repo"),
            "--good", shas[0], "--bad", shas[-1], "--host", "a", "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    assert f"first bad commit: {shas[23]}" in capsys.readouterr().out
    events, _ = read(tmp_path / "run")
    spec = events[0]["config"]
    assert spec["hosts"] == ["a", "a#2"] and spec["search"] == "kary"
    started = [e for e in events if e["event"] == "step-started"]
    assert {e["host"] for e in started} == {"a", "a#2"}  # both VMs of the one host worked
    # a slot's worktree has no `#` in its path (Kbuild's .cmd files would read it as a comment)
    assert len(trees) == 2 and not any("#" in t for t in trees), trees
    # The controller "died" after its fourth result; the resumed run finds slot 2 by its name.
    journal = tmp_path / "run" / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    finished = [i for i, ln in enumerate(lines) if '"event":"step-finished"' in ln]
    journal.write_text("".join(lines[:finished[3] + 1]))
    tested = {r["commit"] for r in replay(read(tmp_path / "run")[0]).steps}
    world.boots.clear()
    report = resume_run(tmp_path / "run", UI(quiet=True))
    assert report.status == "found" and report.culprit == shas[23]
    assert not tested & {c for _, c in world.boots}
    assert {h for h, _ in world.boots} == {"a", "a#2"}


def test_every_host_builds_through_one_cache(tmp_path, fleet):
    shas, world, inventory, inv, playbook, pb = fleet()
    report = run(tmp_path, shas, inventory, inv, playbook, pb, inventory.group("rack1"))
    assert report.status == "found" and report.confirmed is True, report.message
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    retests = [s for s in data["steps"] if s["role"].startswith("confirm-")]
    assert len(retests) == 2
    for s in retests:  # whichever host retests the culprit and its parent reuses the search's build
        assert s["build"].get("cached_from") == s["commit"], s
