"""Pure parts of builds beyond one machine: the build host in the inventory, the environment a
remote build sources, distcc's settings."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from fleetbisect.config.inventory import load_inventory
from fleetbisect.config.playbook import Distcc, Playbook
from fleetbisect.errors import ConfigError
from fleetbisect.stages import distcc
from fleetbisect.stages.remotebuild import env_script

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9 guest"


def host(build_on=None, port=2222, work_dir="/var/tmp/fb"):
    entry = {"ssh": {"address": "127.0.0.1", "port": port, "user": "bisect"}, "work_dir": work_dir,
             "target": {"kind": "qemu", "guest": {"port": 10022, "host_key": KEY}}}
    if build_on:
        entry["build_on"] = build_on
    return entry


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_build_on_names_a_build_host_of_another_file(tmp_path):
    write(tmp_path / "a.yaml", {"hosts": {"lab": host("forge"), "other": host(port=2224)}})
    write(tmp_path / "b.yaml", {"build_hosts": {"forge": {"ssh": {"address": "10.0.0.9", "user": "b"},
                                                          "work_dir": "/srv/build/"}}})
    inv = load_inventory([tmp_path])
    b = inv.host("lab").builder
    assert (b.name, b.work_dir, b.ssh.address) == ("forge", "/srv/build", "10.0.0.9")
    assert b.ssh_params().name == "forge"
    assert inv.host("other").builder is None


def test_a_host_that_builds_its_own_kernel(tmp_path):
    """A bare-metal box names itself: it builds in WORK_DIR/build, reached as the host is."""
    inv = load_inventory([write(tmp_path / "a.yaml", {"hosts": {"metal": host("metal", work_dir="/var/fb"),
                                                                "vm": host("metal", port=2224)}})])
    b = inv.host("metal").builder
    assert (b.name, b.work_dir, b.ssh.port, b.blobs) == ("metal", "/var/fb/build", 2222, "/var/fb/blobs")
    # another host that builds there: the kernel comes back, its blobs are not metal's
    other = inv.host("vm").builder
    assert (other.name, other.ssh.port, other.blobs) == ("metal", 2222, None)


def test_an_unknown_build_host_is_named_with_its_line(tmp_path):
    path = write(tmp_path / "a.yaml", {"hosts": {"lab": host("nowhere")}, "build_hosts": {"forge": {
        "ssh": {"address": "x"}}}})
    with pytest.raises(ConfigError) as e:
        load_inventory([path])
    (problem,) = e.value.problems
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if "build_on" in ln)
    assert problem.startswith(f"{path}:{line} hosts.lab.build_on: no build host 'nowhere' (build_hosts has: forge")


def test_a_build_host_defined_twice_names_both_files(tmp_path):
    bh = {"build_hosts": {"forge": {"ssh": {"address": "x"}}}}
    write(tmp_path / "a.yaml", bh)
    write(tmp_path / "b.yaml", bh)
    with pytest.raises(ConfigError, match=r"b.yaml:\d+ build_hosts.forge: already defined in .*a.yaml"):
        load_inventory([tmp_path])


def playbook(**build):
    return Playbook.model_validate({"name": "p", "build": {"command": "make", **build},
                                    "reproducer": {"kind": "command", "command": "true", "timeout": 5}})


def sourced(script: str, *names: str) -> list[str]:
    """What a POSIX shell gets from sourcing `script`."""
    printf = "; ".join(f'printf "%s\\0" "${n}"' for n in names)
    out = subprocess.run(["sh", "-c", f'. /dev/stdin; {printf}'], input=script, capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    return out.split("\0")[:-1]


def test_the_remote_environment_carries_values_exactly_and_runs_nothing():
    nasty = "it's $(touch /tmp/pwned) `id` \"q\" ; x"
    pb = playbook(env={"KBUILD_SIGN_PIN": nasty, "ARCH": "x86_64"})
    script = env_script(pb, "0123456789abcdef0123")
    assert sourced(script, "KBUILD_SIGN_PIN", "ARCH", "LOCALVERSION") == [nasty, "x86_64", "-fb0123456789ab"]


def test_distcc_goes_first_on_path_and_sets_its_variables():
    pb = playbook(distcc={"hosts": ["127.0.0.1:3632/3", "[::1]:4000", "box"], "fallback": False})
    got = dict(zip(["PATH", "DISTCC_HOSTS", "CC", "MAKEFLAGS", "DISTCC_FALLBACK"],
                   sourced(env_script(pb, "a" * 40), "PATH", "DISTCC_HOSTS", "CC", "MAKEFLAGS", "DISTCC_FALLBACK"), strict=True))
    assert got == {"PATH": "/usr/lib/distcc:/usr/bin:/bin", "DISTCC_HOSTS": "127.0.0.1:3632/3 [::1]:4000 box",
                   "CC": "distcc gcc", "MAKEFLAGS": "-j11", "DISTCC_FALLBACK": "0"}  # 3 + 4 + 4 (distcc's default)
    local = distcc.local_environment(pb.build.distcc, {"PATH": "/bin", "HOME": "/root"})
    assert local["PATH"] == "/usr/lib/distcc:/bin" and local["HOME"] == "/root" and local["MAKEFLAGS"] == "-j11"


@pytest.mark.parametrize("spec,expected", [
    ("127.0.0.1", ("127.0.0.1", 3632)), ("10.0.0.5:4000/8", ("10.0.0.5", 4000)),
    ("[::1]:3633", ("::1", 3633)), ("[fe80::1]/2", ("fe80::1", 3632)), ("box/16", ("box", 3632)),
])
def test_distcc_host_specs(spec, expected):
    assert distcc.endpoint(spec) == expected


def test_jobs_written_win_over_the_limits():
    assert Distcc(hosts=["a/2", "b/2"], jobs=7).make_jobs == 7
    assert Distcc(hosts=["a/2", "b/2"]).make_jobs == 4
