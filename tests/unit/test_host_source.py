"""source: host lends the guest's key to the host's scp through agent forwarding: the agent
answers the two requests ssh makes, with that key only, and refuses the rest."""

from __future__ import annotations

import struct

import paramiko

from fleetbisect.reproducers.host_source import KeyAgent


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b




def make_key(tmp_path):
    import subprocess

    path = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return paramiko.PKey.from_path(path)


def test_it_lists_the_guest_key_and_signs_with_it(tmp_path):
    k = make_key(tmp_path)
    agent = KeyAgent(k)
    reply = agent.answer(b"\x0b")
    assert reply[:1] == b"\x0c" and struct.unpack(">I", reply[1:5])[0] == 1
    m = paramiko.Message(reply[5:])
    assert m.get_binary() == k.asbytes()
    sig = agent.answer(b"\x0d" + _string(k.asbytes()) + _string(b"session data") + struct.pack(">I", 0))
    assert sig[:1] == b"\x0e"
    public = paramiko.Ed25519Key(data=k.asbytes())  # what the guest's sshd checks it against
    assert public.verify_ssh_sig(b"session data", paramiko.Message(paramiko.Message(sig[1:]).get_binary()))
    assert not public.verify_ssh_sig(b"other data", paramiko.Message(paramiko.Message(sig[1:]).get_binary()))


def test_it_refuses_another_key_and_every_other_request(tmp_path):
    k = make_key(tmp_path)
    (tmp_path / "o").mkdir()
    other = make_key(tmp_path / "o")
    agent = KeyAgent(k)
    assert agent.answer(b"\x0d" + _string(other.asbytes() + b"x") + _string(b"d") + struct.pack(">I", 0)) == b"\x05"
    for request in (b"\x11", b"\x12", b"\x13", b"\x19"):  # add, remove, remove all, add constrained
        assert agent.answer(request) == b"\x05"
