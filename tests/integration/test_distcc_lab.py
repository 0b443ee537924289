"""Distributed compilation through a real distccd on loopback (the playbook's build.distcc),
proven by the daemon's own counters, not by make's exit status: distcc falls back to a local
compile silently unless told not to."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from fleetbisect.config.inventory import load_inventory
from fleetbisect.config.playbook import load_playbook
from fleetbisect.deadline import Deadline
from fleetbisect.lab.distccd import LabDistccd
from fleetbisect.stages.build import build

from .test_remotebuild_lab import forge, with_build_host  # noqa: F401 - the build host fixture

SOURCES = 6
# A kernel's Makefile calls `gcc` by name, whatever CC the environment says: so does this one,
# so the compile can only reach distcc through its masquerade directory on PATH.
MAKEFILE = """\
CC = gcc
RELEASE := 1.0-tiny$(LOCALVERSION)
OBJS := $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))
all: out/kernel include/config/kernel.release
out/kernel: $(OBJS)
\t@mkdir -p out && $(CC) -o $@ $(OBJS)
%.o: %.c
\t$(CC) -O1 -c -o $@ $<
include/config/kernel.release: FORCE
\t@mkdir -p $(@D) && echo "$(RELEASE)" > $@
.PHONY: FORCE
"""


@pytest.fixture(autouse=True)
def own_ccache(tmp_path, monkeypatch):
    """A ccache of each test's own: the build stage puts ccache in front of the compiler when it
    is installed, and a compile ccache already saw (an earlier test's) never reaches the daemon,
    whose counter is what these tests read."""
    monkeypatch.setenv("CCACHE_DIR", str(tmp_path / "ccache"))


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    """A small C project in git: SOURCES files compiled with `gcc`, linked into out/kernel."""
    repo = tmp_path_factory.mktemp("tiny") / "tiny"
    (repo / "src").mkdir(parents=True)
    (repo / "Makefile").write_text(MAKEFILE)
    (repo / ".gitignore").write_text("*.o\nout/\ninclude/\n")
    for i in range(1, SOURCES):
        (repo / "src" / f"f{i}.c").write_text(f"int f{i}(int x) {{ return x * {i} + {i * i}; }}\n")
    calls = " + ".join(f"f{i}(argc)" for i in range(1, SOURCES))
    decls = "".join(f"int f{i}(int);\n" for i in range(1, SOURCES))
    (repo / "src" / "main.c").write_text(f"{decls}int main(int argc, char **argv) {{ return ({calls}) & 1; }}\n")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t.invalid", "GIT_CONFIG_GLOBAL": "/dev/null", "PATH": "/usr/bin:/bin"}
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", "tiny"], check=True, env=env)
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    return repo, sha


@pytest.fixture
def daemon(tmp_path):
    assert shutil.which("distccd") and shutil.which("distcc"), ".ci/setup installs distcc"
    d = LabDistccd.start(tmp_path / "distccd")
    try:
        yield d
    finally:
        d.stop()


def tiny_playbook(tmp_path, hosts: list[str], fallback: bool = False):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny",
        "build": {"command": "make", "timeout": "5m", "distcc": {"hosts": hosts, "fallback": fallback}},
        "artifacts": {"kernel": "out/kernel"},
        "reproducer": {"kind": "command", "command": "true", "timeout": "30s"},
    }))
    return load_playbook(path), path


def test_a_build_with_build_distcc_compiles_through_the_daemon(tiny_repo, daemon, tmp_path):
    repo, sha = tiny_repo
    playbook, _ = tiny_playbook(tmp_path, [f"{daemon.host_spec}/2"])
    subprocess.run(["git", "-C", str(repo), "clean", "-qfdx"], check=True)
    before = daemon.compiled()
    res = build(repo, playbook, sha, tmp_path / "step" / "build.log", Deadline.after(300))
    assert res.ok, res.log.read_text()
    assert res.release == f"1.0-tiny-fb{sha[:12]}"
    # every object file was compiled by the daemon: its own counter says so
    assert daemon.compiled() - before == SOURCES
    assert subprocess.run([str(res.artifacts["kernel"])]).returncode in (0, 1)  # it links and runs


def test_a_build_on_a_build_host_uses_distcc_from_there(
        tiny_repo, daemon, forge, lab_host, inventory_file, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    repo, sha = tiny_repo
    host = load_inventory([with_build_host(inventory_file, forge, tmp_path / "inv", lab_host.name)]).host(lab_host.name)
    playbook, _ = tiny_playbook(tmp_path, [daemon.host_spec])
    before = daemon.compiled()
    res = build(repo, playbook, sha, tmp_path / "step" / "build.log", Deadline.after(300), on=host.builder)
    assert res.ok and res.summary == "built on forge", res.log.read_text()
    assert daemon.compiled() - before == SOURCES


def check(inventory, host, playbook):
    """`fleetbisect check --json`: its exit status and its probes, by name."""
    p = subprocess.run([sys.executable, "-m", "fleetbisect", "--json", "check", "--inventory", str(inventory),
                        "--host", host, "--playbook", str(playbook)],
                       capture_output=True, text=True, timeout=300)
    events = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return p.returncode, {e["name"]: e for e in events if e["event"] == "probe"}, p.stderr


def test_check_compiles_through_a_live_daemon_and_names_a_dead_one(
        tmp_path, daemon, inventory_file, lab_host):
    _, playbook = tiny_playbook(tmp_path, [daemon.host_spec])
    name = f"distcc 127.0.0.1:{daemon.port}"
    before = daemon.compiled()
    code, probes, err = check(inventory_file, lab_host.name, playbook)
    assert probes[name]["ok"], err
    assert probes[name]["detail"] == "a test compile with gcc went through the daemon"
    assert daemon.compiled() - before == 1  # it really compiled there

    daemon.stop()
    code, probes, err = check(inventory_file, lab_host.name, playbook)
    assert code == 1 and not probes[name]["ok"], err
    assert probes[name]["detail"].startswith(f"no distcc daemon answers at 127.0.0.1:{daemon.port}: "
                                             "Connection refused"), probes[name]
    assert [n for n, p in probes.items() if not p["ok"]] == [name]  # the daemon, and nothing else


# Run inside namespace a: the build, and check's probe, as fleetbisect runs them.
IN_NAMESPACE = """
import json, sys
from pathlib import Path
from fleetbisect.config.playbook import load_playbook
from fleetbisect.deadline import Deadline
from fleetbisect.remote.local import LocalRemote
from fleetbisect.stages import distcc
from fleetbisect.stages.build import build
repo, sha, playbook, log = sys.argv[1:5]
pb = load_playbook(Path(playbook))
probes = distcc.probe(pb.build.distcc, LocalRemote(), Deadline.after(120))
res = build(Path(repo), pb, sha, Path(log), Deadline.after(300))
print(json.dumps({"ok": res.ok, "release": res.release, "probes": probes}))
"""


def test_a_daemon_on_another_machine_across_a_link(tiny_repo, tmp_path):
    """Two network namespaces joined by a veth pair play two machines: distccd in one, the
    build (and check's probe) in the other, reaching it over the link only."""
    from fleetbisect.lab.netns import NetnsPair

    repo, sha = tiny_repo
    subprocess.run(["git", "-C", str(repo), "clean", "-qfdx"], check=True)
    pair = NetnsPair.create()
    try:
        # allowed: the link's /30 (the build on a, the stats reader on b)
        d = LabDistccd.start(tmp_path / "distccd", address=pair.addresses["b"], allow=f"{pair.addresses['a']}/30",
                             wrap=lambda argv: pair.run_in("b", argv))
        try:
            _, playbook = tiny_playbook(tmp_path, [f"{d.host_spec}/2"])
            before = d.compiled()
            p = subprocess.run(pair.run_in("a", [sys.executable, "-c", IN_NAMESPACE, str(repo), sha, str(playbook),
                                                 str(tmp_path / "step" / "build.log")]),
                               capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stderr
            out = json.loads(p.stdout.strip().splitlines()[-1])
            assert out["ok"] and out["release"] == f"1.0-tiny-fb{sha[:12]}", (tmp_path / "step" / "build.log").read_text()
            assert out["probes"] == [[f"distcc {d.host_spec}", True, "a test compile with gcc went through the daemon"]]
            assert d.compiled() - before == SOURCES + 1  # the build's objects and the probe's
        finally:
            d.stop()
        # the daemon is not on this machine's loopback: from here (no link) nothing answers
        assert subprocess.run(pair.run_in("a", ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{d.port}"]),
                              capture_output=True).returncode != 0
    finally:
        pair.delete()
    assert not any(name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
                   for name in pair.names.values())
