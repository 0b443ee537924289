"""The tolerant known_hosts reader, ssh_config resolution (ProxyJump, ProxyCommand, a file per
host) and the ssh_config the OpenSSH scp path is given. Pure logic, plus OpenSSH's own
`ssh-keygen -H` and `ssh -G` as the reference for what OpenSSH reads."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import paramiko
import pytest

from fleetbisect.errors import UserError
from fleetbisect.remote import openssh
from fleetbisect.remote.base import HostKeyError, SSHParams
from fleetbisect.remote.endpoint import check_host_key, expected_keys, resolve
from fleetbisect.remote.known_hosts import HostKeys, host_matches, parse_file, parse_line

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9"


def new_key(tmp_path: Path, name: str = "k") -> str:
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


def pkey(line: str) -> paramiko.PKey:
    entry = parse_line(f"x {line}")
    assert entry is not None
    return entry.key


# --- parsing: skip what OpenSSH skips -------------------------------------------------------


def test_lines_openssh_skips_are_skipped_not_fatal(tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(
        "# a comment\n"
        "\n"
        "   \n"
        f"@cert-authority *.example.com {KEY_A}\n"
        "garbage line here\n"
        "host ssh-ed25519 AAAA!!notbase64\n"
        "host ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa\n"  # truncated
        "host sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAIA==\n"
        "host ecdsa-sha2-nistp256 " + KEY_A.split()[1] + "\n"  # blob of another type
        "@unknown-marker host " + KEY_A + "\n"
        "onlyhost\n"
        "\xff\xfe binary junk\n"
        f"good.example {KEY_A} a comment\n"
    )
    entries = parse_file(str(kh))
    assert [(e.hosts, e.revoked, e.source) for e in entries] == [("good.example", False, f"{kh}:13")]
    # paramiko's own loader dies on the same file: this is what the reader replaces
    with pytest.raises(Exception):
        paramiko.HostKeys(str(kh))


def test_missing_file_is_empty_and_revoked_lines_are_kept(tmp_path):
    assert parse_file(str(tmp_path / "missing")) == []
    entry = parse_line(f"@revoked * {KEY_A}")
    assert entry is not None and entry.revoked and entry.matches("anything")


# --- host patterns ----------------------------------------------------------------------------


@pytest.mark.parametrize("hosts,name,expected", [
    ("host.example", "host.example", True),
    ("HOST.example", "host.EXAMPLE", True),
    ("other,host.example", "host.example", True),
    ("*.example", "a.b.example", True),
    ("*.example,!bad.example", "bad.example", False),
    ("!bad.example,*.example", "bad.example", False),
    ("!bad.example", "good.example", False),  # a negation alone matches nothing
    ("web?", "web1", True),
    ("web?", "web12", False),
    ("[127.0.0.1]:2222", "[127.0.0.1]:2222", True),
    ("[127.0.0.1]:2222", "[127.0.0.1]:2223", False),
    ("127.0.0.1", "[127.0.0.1]:2222", False),  # a non-22 port is only found in [host]:port form
    ("[127.0.0.1]:*", "[127.0.0.1]:2222", True),
    ("[127.0.0.?]:2222", "[127.0.0.1]:2222", True),
])
def test_host_patterns(hosts, name, expected):
    assert host_matches(hosts, name) is expected


def test_hashed_names_as_openssh_writes_them(tmp_path):
    assert shutil.which("ssh-keygen"), "ssh-keygen missing: .ci/setup installs openssh-client"
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:2222 {KEY_A}\nplain.example {KEY_A}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(kh)], check=True, capture_output=True)
    text = kh.read_text()
    assert "127.0.0.1" not in text and text.startswith("|1|")
    keys = HostKeys.read([str(kh)], "[127.0.0.1]:2222")
    assert [k.get_base64() for _, k in keys.accepted] == [KEY_A.split()[1]]
    assert HostKeys.read([str(kh)], "[127.0.0.1]:2223").accepted == []
    assert len(HostKeys.read([str(kh)], "PLAIN.example").accepted) == 1


# --- checking: @revoked wins ------------------------------------------------------------------


def test_a_revoked_key_is_refused_even_when_another_line_accepts_it(tmp_path):
    kh, other = tmp_path / "known_hosts", tmp_path / "global"
    kh.write_text(f"[h]:2222 {KEY_A}\n")
    other.write_text(f"@revoked [h]:* {KEY_A}\n")
    from fleetbisect.remote.endpoint import Endpoint

    ep = Endpoint("h", 2222, "u", (), (str(kh), str(other)))
    keys, fix = expected_keys("host1", ep)
    with pytest.raises(HostKeyError) as info:
        check_host_key("host1", ep, pkey(KEY_A), keys, fix)
    msg = str(info.value)
    assert "REVOKED" in msg and "@revoked" in msg and str(other) in msg and msg.startswith("host1: ")
    # the same key for another host is not revoked by a line that does not match it
    ep2 = Endpoint("h2", 22, "u", (), (str(other),))
    keys2, fix2 = expected_keys("host2", ep2)
    with pytest.raises(HostKeyError, match="unknown host key"):
        check_host_key("host2", ep2, pkey(KEY_A), keys2, fix2)
    # a key that is not revoked and is known passes
    kb = new_key(tmp_path)
    kh.write_text(f"[h]:2222 {kb}\n")
    keys, fix = expected_keys("host1", ep)
    check_host_key("host1", ep, pkey(kb), keys, fix)


# --- resolving ssh_config ---------------------------------------------------------------------


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return str(path)


def test_ssh_config_file_per_host_and_proxyjump_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))
    cfg = write_config(tmp_path, (
        "Host rack-*\n  User ops\n  ProxyJump bastion,inner:2200\n"
        "Host rack-7\n  HostName 10.1.2.7\n  Port 2022\n"
        "Host bastion\n  HostName bastion.example\n  User jump\n  IdentityFile /keys/bastion\n"
        "  UserKnownHostsFile /kh/bastion\n"
        "Host inner\n  HostName inner.example\n"
    ))
    params = SSHParams(name="rack-7", alias="rack-7", ssh_config=cfg, key_files=("/keys/fleet",),
                       known_hosts=("/kh/fleet",))
    ep = resolve(params)
    assert (ep.host, ep.port, ep.user, ep.key_files) == ("10.1.2.7", 2022, "ops", ("/keys/fleet",))
    assert [(h.host, h.port, h.user) for h in ep.jumps] == [
        ("bastion.example", 22, "jump"), ("inner.example", 2200, ep.jumps[1].user)]
    bastion, inner = ep.jumps
    assert bastion.key_files == ("/keys/bastion",) and bastion.known_hosts == ("/kh/bastion",)
    assert inner.key_files == ("/keys/fleet",) and inner.known_hosts == ("/kh/fleet",)
    assert not inner.use_agent and bastion.use_agent  # only the inventory's key goes to inner
    assert bastion.role == "jump host bastion"


def test_proxyjump_forms_and_first_hop_recursion(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = write_config(tmp_path, (
        "Host t\n  ProxyJump ssh://alice@gw:2201,[::1]:2202\n"
        "Host gw\n  ProxyJump outer\n"
        "Host none\n  ProxyJump none\n"
        "Host loop\n  ProxyJump loop\n"
    ))
    ep = resolve(SSHParams(name="t", alias="t", ssh_config=cfg))
    assert [(h.user, h.host, h.port) for h in ep.jumps][0][1] == "outer"
    assert [(h.host, h.port) for h in ep.jumps[1:]] == [("gw", 2201), ("::1", 2202)]
    assert ep.jumps[1].user == "alice"
    assert resolve(SSHParams(name="n", alias="none", ssh_config=cfg)).jumps == ()
    with pytest.raises(UserError, match="longer than"):
        resolve(SSHParams(name="l", alias="loop", ssh_config=cfg))


def test_proxycommand_is_refused_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = write_config(tmp_path, (
        "Host direct\n  HostName 127.0.0.1\n  ProxyCommand ssh -W %h:%p bastion\n"
        "Host hop\n  ProxyCommand nc %h %p\n"
        "Host via-hop\n  ProxyJump hop\n"
    ))
    for alias in ("direct", "via-hop"):
        with pytest.raises(UserError) as info:
            resolve(SSHParams(name="h1", alias=alias, ssh_config=cfg))
        assert "ProxyCommand is not supported; use ProxyJump" in str(info.value)
    # the default ~/.ssh/config is read the same way
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host lab\n  ProxyCommand nc %h %p\n")
    with pytest.raises(UserError, match="ProxyCommand is not supported"):
        resolve(SSHParams(name="h1", alias="lab"))


def test_missing_ssh_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve(SSHParams(name="h", alias="x", ssh_config=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="no address"):
        resolve(SSHParams(name="h"))


# --- the ssh_config given to OpenSSH ------------------------------------------------------------


def test_openssh_config_trusts_exactly_what_paramiko_trusts(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    ka, kb = new_key(tmp_path, "a"), new_key(tmp_path, "b")
    kh = tmp_path / "known_hosts"
    kh.write_text(
        f"@cert-authority * {ka}\n"
        f"bastion.example {kb}\n"
        f"[10.0.0.7]:2022 {ka}\n"
        f"@revoked * {kb}\n"
        "not a key line\n"
    )
    cfg = write_config(tmp_path, (
        "Host rack-7\n  HostName 10.0.0.7\n  Port 2022\n  User ops\n  ProxyJump bastion\n"
        "Host bastion\n  HostName bastion.example\n  IdentityFile /keys/b%d\n"
    ))
    params = SSHParams(name="rack-7", alias="rack-7", ssh_config=cfg, known_hosts=(str(kh),))
    ep = resolve(params)
    text = openssh.ssh_config(params, ep, tmp_path / "scp_known_hosts")
    written = (tmp_path / "scp_known_hosts").read_text().splitlines()
    assert written == [
        f"fleetbisect-hop-1 {kb}", f"@revoked fleetbisect-hop-1 {kb}",
        f"fleetbisect-target {ka}", f"@revoked fleetbisect-target {kb}",
    ]
    assert shutil.which("ssh"), "ssh missing: .ci/setup installs openssh-client"
    # what OpenSSH makes of it (ssh -G: evaluate the config, connect nowhere)
    config = tmp_path / "for-openssh"
    config.write_text(text)

    def resolved(alias: str) -> dict[str, str]:
        out = subprocess.run(["ssh", "-G", "-F", str(config), alias], check=True,
                             capture_output=True, text=True).stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    target = resolved(openssh.TARGET)
    assert (target["hostname"], target["port"], target["user"]) == ("10.0.0.7", "2022", "ops")
    assert target["proxyjump"] == "fleetbisect-hop-1"
    assert target["stricthostkeychecking"] in ("yes", "true")
    assert target["globalknownhostsfile"] == "/dev/null"
    hop = resolved("fleetbisect-hop-1")
    assert hop["hostname"] == "bastion.example"
    assert hop["identityfile"] == ep.jumps[0].key_files[0] == f"/keys/b{tmp_path}"  # read back as is
    assert "proxyjump" not in hop


def test_inventory_ssh_config_reaches_the_params(tmp_path, monkeypatch):
    from fleetbisect.config.inventory import SSH

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "ssh_config").write_text("Host lab\n  HostName 127.0.0.1\n")
    params = SSH(alias="lab", ssh_config="~/fleet/ssh_config").params("h1")
    assert params.ssh_config == str(tmp_path / "fleet" / "ssh_config")
    assert SSH(address="10.0.0.1").params("h1").ssh_config is None
    with pytest.raises(ValueError, match="no such file"):  # found at load time, not at connect
        SSH(alias="lab", ssh_config="~/fleet/missing")
