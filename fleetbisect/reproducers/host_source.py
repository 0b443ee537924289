"""`source: host`: the stress file is made once on the VM host and copied from there into the
guest, so no stress byte crosses the controller's link (a night of 15 x 1 GiB per step costs
the user's uplink nothing).

- The file: `WORK_DIR/stress/SIZE.bin`, random bytes from the host's /dev/urandom, made once
  (kept across steps and runs; remade when its size is wrong).
- The copy: the host's own OpenSSH `scp -O` to the guest (at the address and port the guest
  has for the host), with the guest's pinned host key in a known_hosts file written on the host
  (`WORK_DIR/stress/known_hosts`, public keys only), strict checking, batch mode, no ssh_config.
- The login: the guest's private key never leaves this machine. The host's scp signs with it
  through agent forwarding on that one session, answered here by a minimal ssh-agent holding
  only the guest's key (`KeyAgent`); without a key file, the user's own agent is forwarded.
- Progress: a loop on the host prints what scp has read of the file (`rchar` of /proc/PID/io)
  every 0.1 s; a stall or the deadline kills scp's process group on the host (`env kill -- -PID`,
  the session `setsid` gave it).
"""

from __future__ import annotations

import struct
import threading
import time

import paramiko
import paramiko.agent

from ..deadline import Deadline
from ..remote import openssh
from ..remote.base import RemoteError, TransferStats, TransferTimedOut, bounded
from ..remote.connect import left as _left
from ..remote.endpoint import known_hosts_lines
from ..remote.ssh import SSHRemote
from . import ReproContext
from .watch import Watch

ALIAS = "fleetbisect-guest"

# $1 file $2 size: make the stress file once
_MAKE = r"""
f=$1; size=$2
[ "$(stat -c %s "$f" 2>/dev/null)" = "$size" ] && exit 0
mkdir -p "$(dirname "$f")" && head -c "$size" /dev/urandom > "$f.part" && mv "$f.part" "$f"
"""

# $1 file $2 dest $3 known_hosts $4 port $5 user@address $6 ciphers: copy, printing progress
_COPY = r"""
f=$1; dest=$2; kh=$3; port=$4; target=$5; ciphers=$6
setsid scp -O -q -B -F /dev/null -c "$ciphers" -P "$port" \
  -o UserKnownHostsFile="$kh" -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes \
  -o HostKeyAlias=fleetbisect-guest -o UpdateHostKeys=no -o CheckHostIP=no -o ConnectTimeout=10 \
  -o ServerAliveInterval=5 "$f" "$target:$dest" < /dev/null &
pid=$!
echo "pid $pid"
# (kill -0 also succeeds for a zombie: ask /proc whether it still runs)
while read -r _ _ state _ < /proc/$pid/stat 2>/dev/null && [ "$state" != Z ]; do
  echo "r $(sed -n 's/^rchar: //p' /proc/$pid/io 2>/dev/null)"
  sleep 0.1
done
wait "$pid"; echo "exit $?"
"""


class KeyAgent:
    """The ssh-agent protocol for one key, on channels the host opens back to us (agent
    forwarding): it lists the key and signs with it, and refuses everything else."""

    def __init__(self, key: paramiko.PKey):
        self.key = key

    def __call__(self, chan: paramiko.Channel) -> None:  # called in the transport's thread
        threading.Thread(target=self._serve, args=(chan,), daemon=True, name="fleetbisect-agent").start()

    def _serve(self, chan: paramiko.Channel) -> None:
        try:
            chan.settimeout(60)
            while True:
                head = _recv_exactly(chan, 4)
                if head is None:
                    return
                body = _recv_exactly(chan, struct.unpack(">I", head)[0])
                if body is None:
                    return
                reply = self.answer(body)
                chan.sendall(struct.pack(">I", len(reply)) + reply)
        except (OSError, EOFError, paramiko.SSHException):
            return
        finally:
            chan.close()

    def answer(self, body: bytes) -> bytes:
        """One request (type byte + payload) -> one reply (type byte + payload)."""
        blob = self.key.asbytes()
        if body[:1] == b"\x0b":  # SSH2_AGENTC_REQUEST_IDENTITIES
            return b"\x0c" + struct.pack(">I", 1) + _string(blob) + _string(b"fleetbisect guest key")
        if body[:1] == b"\x0d":  # SSH2_AGENTC_SIGN_REQUEST: key blob, data, flags
            m = paramiko.Message(body[1:])
            if m.get_binary() != blob:
                return b"\x05"
            data, flags = m.get_binary(), m.get_int()
            algorithm = {2: "rsa-sha2-256", 4: "rsa-sha2-512"}.get(flags) if self.key.get_name() == "ssh-rsa" else None
            return b"\x0e" + _string(self.key.sign_ssh_data(data, algorithm).asbytes())
        return b"\x05"  # SSH_AGENT_FAILURE


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _recv_exactly(chan: paramiko.Channel, n: int) -> bytes | None:
    out = b""
    while len(out) < n:
        more = chan.recv(n - len(out))
        if not more:
            return None
        out += more
    return out


def _guest_key(guest: SSHRemote) -> paramiko.PKey | None:
    for path in guest.endpoint.key_files:
        try:
            return paramiko.PKey.from_path(path)
        except (OSError, paramiko.SSHException):
            continue
    return None


def prepare(spec, ctx: ReproContext):
    """Make the stress file and the known_hosts file on the host; returns copy(deadline, watch)."""
    host, guest = ctx.host, ctx.guest
    if not isinstance(host, SSHRemote) or not isinstance(guest, SSHRemote):
        raise RemoteError(getattr(host, "name", "host"), "source: host needs SSH to the host and to the guest")
    work = ctx.target.host_cfg.work_dir.rstrip("/") + "/stress"
    path, known = f"{work}/{spec.size}.bin", f"{work}/known_hosts"
    host.run(["sh", "-c", _MAKE, "sh", path, str(spec.size)], check=True,
             deadline=Deadline.after(120 + spec.size / 20e6))
    host.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", known], check=True,
             stdin="".join(line + "\n" for line in known_hosts_lines(guest.endpoint, ALIAS)).encode(),
             deadline=Deadline.after(30))
    agent = KeyAgent(key) if (key := _guest_key(guest)) else None
    ep = guest.endpoint
    argv = ["sh", "-c", _COPY, "sh", path, spec.dest, known, str(ep.port), f"{ep.user}@{ep.host}",
            openssh.CIPHERS]

    def copy(deadline: Deadline, watch: Watch) -> TransferStats:
        return _copy(host, argv, spec.size, spec.dest, agent, deadline, watch)

    return copy


def _copy(host: SSHRemote, argv: list[str], size: int, dest: str, agent: KeyAgent | None,
          deadline: Deadline, watch: Watch) -> TransferStats:
    started = time.monotonic()
    pid: list[str] = []

    def stop(reason: str) -> None:  # the scp (and its ssh) this copy started on the host
        if pid:
            try:
                host.run(["env", "kill", "-KILL", "--", f"-{pid[0]}"], deadline=Deadline.after(15))
            except RemoteError:
                pass

    watch.on_stall = stop
    chan = host.transport(deadline).open_session(timeout=_left(deadline))
    status, err = None, b""
    try:
        if agent is not None:
            chan.request_forward_agent(agent)
        else:
            paramiko.agent.AgentRequestHandler(chan)
        chan.exec_command(bounded(argv, deadline.remaining() + 10))
        buf = b""
        while status is None:
            chan.settimeout(min(1.0, _left(deadline) + 15))
            try:
                data = chan.recv(4096)
            except TimeoutError:
                if deadline.remaining() + 15 <= 0:
                    break
                continue
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(4096)
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                word, _, value = line.decode(errors="replace").partition(" ")
                if word == "pid":
                    pid.append(value)
                elif word == "r" and value.isdigit():
                    watch.progress(min(size, int(value)))
                elif word == "exit":
                    status = int(value) if value.isdigit() else -1
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(4096)
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise RemoteError(host.name, f"copy from the host into the guest: {e}") from None
    finally:
        chan.close()
    if status == 0:
        watch.progress(size)
        return TransferStats(dest, size, time.monotonic() - started)
    if watch.stalled or watch.timed_out or status is None:
        raise TransferTimedOut(host.name, dest, deadline.seconds, watch.done)
    raise RemoteError(host.name, f"scp from the host to {dest} in the guest exited {status}: "
                                 f"{err.decode(errors='replace').strip()[-300:]}")
