"""How SSHRemote finds and trusts a host, against real sshds on loopback: known_hosts files as
users have them (@cert-authority, garbage, hashed names, @revoked), ProxyJump through a second
lab host, an ssh_config file per host, and the generation that tells a tunnel's user that the
host connection under it was cut."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fleetbisect.deadline import Deadline
from fleetbisect.errors import UserError
from fleetbisect.lab.vmhost import LabHost, _children
from fleetbisect.remote.base import HostKeyError, RemoteError, SSHParams
from fleetbisect.remote.ssh import SSHRemote

D = Deadline.after


@pytest.fixture(scope="module")
def jump_host(tmp_path_factory):
    host = LabHost.start(tmp_path_factory.mktemp("jump-host"), name="jump-host")
    try:
        yield host
    finally:
        host.stop()


def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = D(seconds)
    while not predicate():
        if deadline.expired:
            pytest.fail(f"{what}: not within {seconds}s")
        time.sleep(0.05)


def logins(host: LabHost) -> int:
    return host.log.read_text(errors="replace").count("Accepted publickey")


def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(1 << 20) * 20)  # above openssh.BULK: goes through scp
    return path


# --- known_hosts as users have them -------------------------------------------------------------


def test_known_hosts_with_markers_garbage_and_hashed_names(lab_host, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{lab_host.port} {lab_host.host_public_key}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(kh)], check=True, capture_output=True)
    kh.write_text(
        "# the fleet\n"
        f"@cert-authority *.example.com {lab_host.host_public_key}\n"
        "this line is garbage\n"
        "broken.example ssh-ed25519 AAAA!!\n"
        + kh.read_text()
    )
    assert f"127.0.0.1]:{lab_host.port}" not in kh.read_text()  # only the hashed name is left
    params = replace(lab_host.ssh_params(), known_hosts=(str(kh),))
    with SSHRemote.connect(params, deadline=D(10)) as remote:
        assert remote.run(["echo", "ok"], deadline=D(10)).stdout == "ok\n"
        # the OpenSSH path trusts the same entry (one OpenSSH login, no fallback)
        before = logins(lab_host)
        big = big_file(tmp_path)
        remote.put(big, str(tmp_path / "dst.bin"), deadline=D(60))
        assert logins(lab_host) == before + 1 and not remote._openssh_unusable


def test_a_revoked_host_key_is_refused(lab_host, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(
        f"[127.0.0.1]:{lab_host.port} {lab_host.host_public_key}\n"
        f"@revoked * {lab_host.host_public_key}\n"
    )
    params = replace(lab_host.ssh_params(), known_hosts=(str(kh),))
    before = logins(lab_host)
    with pytest.raises(HostKeyError) as info:
        SSHRemote.connect(params, deadline=D(10))
    msg = str(info.value)
    assert "REVOKED" in msg and "@revoked" in msg and str(kh) in msg and "SHA256:" in msg
    assert logins(lab_host) == before  # refused before authenticating
    # the OpenSSH path refuses it too: connected before the revocation, a big upload finds
    # scp refused (no login of its own) and goes over the connection verified before
    kh.write_text(f"[127.0.0.1]:{lab_host.port} {lab_host.host_public_key}\n")
    with SSHRemote.connect(params, deadline=D(10)) as remote:
        with open(kh, "a") as f:
            f.write(f"@revoked [127.0.0.1]:* {lab_host.host_public_key}\n")
        before = logins(lab_host)
        big = big_file(tmp_path)
        remote.put(big, str(tmp_path / "dst.bin"), deadline=D(60))
        assert logins(lab_host) == before and remote._openssh_unusable
        assert (tmp_path / "dst.bin").read_bytes() == big.read_bytes()




# --- ProxyJump ------------------------------------------------------------------------------------


def jump_config(tmp_path: Path, lab_host: LabHost, jump_host: LabHost, jump: str = "jump") -> Path:
    """ssh_config: `target` is the lab host, reached through `jump` (the jump host)."""
    path = tmp_path / "ssh_config"
    path.write_text(
        f"Host target\n  HostName 127.0.0.1\n  Port {lab_host.port}\n  User {lab_host.user}\n"
        f"  IdentityFile {lab_host.user_key}\n  ProxyJump {jump}\n"
        f"Host jump jump2\n  HostName 127.0.0.1\n  Port {jump_host.port}\n  User {jump_host.user}\n"
        f"  IdentityFile {jump_host.user_key}\n  UserKnownHostsFile {jump_host.known_hosts}\n"
    )
    return path


def tcp_owner(local_port: int) -> int | None:
    """PID of the process holding the loopback TCP socket bound to `local_port`."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == local_port:
            inode = fields[9]
            break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return int(pid)
            except OSError:
                continue
    return None


def test_proxyjump_goes_through_the_jump_host(lab_host, jump_host, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/config of the machine's user
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    config = jump_config(tmp_path, lab_host, jump_host)
    params = SSHParams(name="behind-jump", alias="target", ssh_config=str(config),
                       known_hosts=(str(lab_host.known_hosts),))
    before = logins(jump_host)
    remote = SSHRemote.connect(params, deadline=D(15))
    try:
        assert logins(jump_host) == before + 1
        jumps = list(remote._jumps)
        assert len(jumps) == 1 and jumps[0].is_active()
        assert not isinstance(remote._transport.sock, socket.socket)  # a channel of the jump
        # the target sshd saw a TCP connection opened by the jump host's sshd, not by us
        client = remote.run("echo $SSH_CLIENT", deadline=D(10), check=True).stdout.split()
        owner = tcp_owner(int(client[1]))
        assert owner is not None and owner in _children(jump_host.pid), (owner, client)
        # the OpenSSH scp path takes the same way: one more login on the jump host
        before = logins(jump_host)
        big = big_file(tmp_path)
        remote.put(big, str(tmp_path / "dst.bin"), deadline=D(60))
        assert not remote._openssh_unusable and logins(jump_host) == before + 1
        assert (tmp_path / "dst.bin").read_bytes() == big.read_bytes()
    finally:
        remote.close()
    assert not jumps[0].is_active() and remote._jumps == []  # closed with the remote


def test_proxyjump_chain_and_reconnect(lab_host, jump_host, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    config = jump_config(tmp_path, lab_host, jump_host, jump="jump,jump2")
    params = SSHParams(name="chain", alias="target", ssh_config=str(config),
                       known_hosts=(str(lab_host.known_hosts),))
    before = logins(jump_host)
    with SSHRemote.connect(params, deadline=D(15)) as remote:
        assert logins(jump_host) == before + 2 and len(remote._jumps) == 2
        first = list(remote._jumps)
        first[0].sock.shutdown(socket.SHUT_RDWR)  # the TCP connection to the first hop drops
        wait_until(lambda: not remote._transport.is_active(), 10, "the cut is noticed")
        assert remote.run(["echo", "back"], deadline=D(15)).stdout == "back\n"
        assert remote.generation == 2 and logins(jump_host) == before + 4
        assert not any(t.is_active() for t in first)  # the old hops were closed


def test_jump_host_key_is_checked(lab_host, jump_host, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = jump_config(tmp_path, lab_host, jump_host)
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    config.write_text(config.read_text().replace(str(jump_host.known_hosts), str(empty)))
    params = SSHParams(name="behind-jump", alias="target", ssh_config=str(config),
                       known_hosts=(str(lab_host.known_hosts),))
    before = logins(lab_host)
    with pytest.raises(HostKeyError) as info:
        SSHRemote.connect(params, deadline=D(15))
    assert "jump host jump" in str(info.value) and "unknown host key" in str(info.value)
    assert logins(lab_host) == before


def test_proxycommand_is_refused_not_ignored(lab_host, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "ssh_config"
    config.write_text(f"Host lab\n  HostName 127.0.0.1\n  Port {lab_host.port}\n"
                      f"  IdentityFile {lab_host.user_key}\n  ProxyCommand nc %h %p\n")
    params = SSHParams(name="lab", alias="lab", ssh_config=str(config),
                       known_hosts=(str(lab_host.known_hosts),))
    before = logins(lab_host)
    with pytest.raises(UserError) as info:
        SSHRemote.connect(params, deadline=D(10))
    assert "ProxyCommand is not supported; use ProxyJump" in str(info.value)
    assert logins(lab_host) == before  # it did not connect around the proxy


# --- an ssh_config file per host --------------------------------------------------------------------


def test_ssh_config_file_instead_of_the_users(lab_host, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host lab-alias\n  HostName 127.0.0.9\n  Port 9\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    config = tmp_path / "fleet_ssh_config"
    config.write_text(f"Host lab-alias\n  HostName 127.0.0.1\n  Port {lab_host.port}\n"
                      f"  User {lab_host.user}\n  IdentityFile {lab_host.user_key}\n"
                      f"  UserKnownHostsFile {lab_host.known_hosts}\n")
    params = SSHParams(name="lab", alias="lab-alias", ssh_config=str(config))
    with SSHRemote.connect(params, deadline=D(10)) as remote:
        assert remote.endpoint.port == lab_host.port
        before = logins(lab_host)
        big = big_file(tmp_path)
        remote.put(big, str(tmp_path / "dst.bin"), deadline=D(60))
        assert logins(lab_host) == before + 1 and not remote._openssh_unusable


# --- the generation under a tunnel -------------------------------------------------------------


def test_tunnel_knows_when_its_host_connection_was_cut_and_reestablished(ssh, lab_host):
    assert ssh.generation == 1
    chan = ssh.open_tunnel("127.0.0.1", lab_host.port, D(10))
    assert ssh.tunnel_lost(chan) is None
    guest = SSHRemote.connect(lab_host.ssh_params(name="lab-host/guest"), deadline=D(10), sock=chan)
    try:
        assert guest.run(["true"], deadline=D(10)).ok
        ssh._transport.sock.shutdown(socket.SHUT_RDWR)  # the host link drops
        with pytest.raises(RemoteError):
            guest.run(["true"], deadline=D(10))
        assert "was cut" in (ssh.tunnel_lost(chan, D(10)) or "")
        assert ssh.run(["true"], deadline=D(10)).ok  # the host connection comes back ...
        assert ssh.generation == 2
        lost = ssh.tunnel_lost(chan)  # ... but not the one under the guest's tunnel
        assert lost is not None and "re-established" in lost and "1 -> 2" in lost
        fresh = ssh.open_tunnel("127.0.0.1", lab_host.port, D(10))
        assert ssh.tunnel_lost(fresh) is None and ssh.tunnel_lost(fresh, D(10)) is None
        fresh.close()
    finally:
        guest.close()
