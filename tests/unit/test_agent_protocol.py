"""The guest agent client's logic against a scripted qemu-ga on the far end of a socketpair
(the real qemu-ga is exercised in tests/integration/test_agent*.py)."""

from __future__ import annotations

import base64
import json
import socket
import threading

import pytest

from fleetbisect.deadline import Deadline
from fleetbisect.remote.agent import (
    AgentError,
    AgentRemote,
    AgentTimeout,
    StreamTransport,
    relay_argv,
)
from fleetbisect.remote.base import CommandTimedOut, RemoteError, Result


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


class FakeAgent:
    """Answers qemu-ga's commands on one end of a socketpair, in a thread. `awake` is set when
    it starts answering (requests before that are read all the same, as the virtio-serial
    queue hands them over late); `handlers` map a command to a function(arguments) -> reply."""

    def __init__(self, *, stale: bytes = b"", awake: bool = True):
        self.ours, self.theirs = socket.socketpair()
        self.received: list[dict] = []
        self.awake = threading.Event()
        if awake:
            self.awake.set()
        self.files: dict[str, bytearray] = {}
        self.handles: dict[int, tuple[str, int]] = {}
        self.statuses: dict[int, list[dict]] = {}
        self.handlers = {
            "guest-sync-delimited": lambda a: ("\xff", {"return": a["id"]}),
            "guest-ping": lambda a: {"return": {}},
            "guest-exec": self._exec,
            "guest-exec-status": lambda a: {"return": self.statuses[a["pid"]].pop(0)},
            "guest-file-open": self._open,
            "guest-file-write": self._write,
            "guest-file-read": self._read,
            "guest-file-close": lambda a: {"return": {}},
        }
        self.exec_results: list[list[dict]] = []
        if stale:
            self.theirs.sendall(stale)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def transport(self) -> StreamTransport:
        return StreamTransport("fake/guest", lambda deadline: self.ours)

    def _exec(self, a):
        pid = 100 + len(self.statuses)
        self.statuses[pid] = self.exec_results.pop(0)
        return {"return": {"pid": pid}}

    def _open(self, a):
        h = 1000 + len(self.handles)
        self.handles[h] = (a["path"], 0)
        if a["mode"] == "w":
            self.files[a["path"]] = bytearray()
        return {"return": h}

    def _write(self, a):
        path, _ = self.handles[a["handle"]]
        data = base64.b64decode(a["buf-b64"])
        self.files[path] += data
        return {"return": {"count": len(data), "eof": False}}

    def _read(self, a):
        path, pos = self.handles[a["handle"]]
        data = bytes(self.files[path][pos:pos + a["count"]])
        self.handles[a["handle"]] = (path, pos + len(data))
        return {"return": {"count": len(data), "buf-b64": b64(data), "eof": pos + len(data) >= len(self.files[path])}}

    def _serve(self):
        buf = b""
        while True:
            try:
                chunk = self.theirs.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                line = line.replace(b"\xff", b"")
                self.awake.wait()
                req = json.loads(line)
                self.received.append(req)
                reply = self.handlers[req["execute"]](req.get("arguments", {}))
                if reply is None:
                    continue
                prefix = ""
                if isinstance(reply, tuple):
                    prefix, reply = reply
                try:
                    self.theirs.sendall(prefix.encode("latin-1") + json.dumps(reply).encode() + b"\n")
                except OSError:
                    return

    def commands(self) -> list[str]:
        return [r["execute"] for r in self.received]

    def close(self):
        self.awake.set()
        self.theirs.close()
        self.ours.close()


@pytest.fixture
def fake():
    agents = []

    def make(**kw):
        agents.append(FakeAgent(**kw))
        return agents[-1]

    yield make
    for a in agents:
        a.close()


def test_stale_replies_and_half_messages_before_the_sync_are_dropped(fake):
    # A previous client left a reply and half a message behind (and a reply with a sentinel).
    agent = fake(stale=b'{"return": 42}\n\xff{"return": 7}\n{"return": {"pi')
    agent.exec_results.append([{"exited": True, "exitcode": 0, "out-data": b64("6.1.0-fb1\n")}])
    guest = AgentRemote.connect(agent.transport(), deadline=Deadline.after(5))
    res = guest.run(["uname", "-r"], deadline=Deadline.after(5))
    assert res.stdout == "6.1.0-fb1\n" and res.exit_status == 0
    assert agent.commands()[:2] == ["guest-sync-delimited", "guest-ping"]


def test_a_silent_agent_is_a_remote_error_at_the_deadline_never_a_hang(fake):
    agent = fake(awake=False)
    with pytest.raises(AgentTimeout) as e:
        AgentRemote.connect(agent.transport(), deadline=Deadline.after(0.6))
    assert isinstance(e.value, RemoteError)  # infrastructure: judged by the caller, not a verdict
    assert "did not answer within 0.6s" in str(e.value)


def test_an_agent_that_starts_late_answers_every_queued_sync_and_the_stream_stays_in_step(fake):
    agent = fake(awake=False)
    got = {}

    def connect():
        got["guest"] = AgentRemote.connect(agent.transport(), deadline=Deadline.after(10))

    t = threading.Thread(target=connect)
    t.start()
    # Wake the agent once three syncs are queued (each answered in turn, as qemu-ga does).
    while sum(1 for _ in _syncs_sent(agent)) < 3:
        threading.Event().wait(0.01)
    agent.awake.set()
    t.join()
    agent.exec_results.append([{"exited": True, "exitcode": 0, "out-data": b64("hello\n")}])
    assert got["guest"].run("echo hello", deadline=Deadline.after(5)).stdout == "hello\n"
    syncs = [r["arguments"]["id"] for r in agent.received if r["execute"] == "guest-sync-delimited"]
    assert len(syncs) >= 3 and len(set(syncs)) == len(syncs)  # fresh random ids


def _syncs_sent(agent):
    # what the client wrote so far, read without consuming it
    try:
        data = agent.theirs.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return []
    return [ln for ln in data.split(b"\n") if b"guest-sync-delimited" in ln]


def test_exec_output_is_decoded_and_status_polled_until_it_exited(fake):
    agent = fake()
    agent.exec_results.append([
        {"exited": False}, {"exited": False},
        {"exited": True, "exitcode": 3, "out-data": b64("out\n"), "err-data": b64("err \xe9\n")},
    ])
    guest = AgentRemote.connect(agent.transport(), deadline=Deadline.after(5))
    res = guest.run(["sh", "-c", "echo out; exit 3"], deadline=Deadline.after(5), stdin=b"input")
    assert (res.exit_status, res.stdout, res.stderr) == (3, "out\n", "err \xe9\n")
    assert agent.commands().count("guest-exec-status") == 3
    exec_req = next(r for r in agent.received if r["execute"] == "guest-exec")["arguments"]
    assert exec_req["path"] == "/bin/sh" and exec_req["capture-output"] is True
    # bounded in the guest too, and the words quoted
    assert exec_req["arg"][0] == "-c" and exec_req["arg"][1].startswith("timeout -k 5 ")
    assert "'sh -c '\"'\"'echo out; exit 3'\"'\"''" in exec_req["arg"][1]
    assert base64.b64decode(exec_req["input-data"]) == b"input"


def test_a_command_killed_by_a_signal_exits_like_a_shell_says(fake):
    agent = fake()
    agent.exec_results.append([{"exited": True, "signal": 9}])
    guest = AgentRemote.connect(agent.transport(), deadline=Deadline.after(5))
    assert guest.run("sleep 100", deadline=Deadline.after(5)).exit_status == 137


def test_a_command_past_its_deadline_times_out_and_the_stream_is_resynced(fake):
    agent = fake()
    agent.exec_results.append([{"exited": False}] * 100000)
    guest = AgentRemote.connect(agent.transport(), deadline=Deadline.after(5))
    with pytest.raises(CommandTimedOut):
        guest.run("sleep 100", deadline=Deadline.after(0.3))
    # An exchange cut by its deadline leaves the stream unknown (its reply may come later):
    # the next exchange syncs first.
    agent.handlers["guest-exec-status"] = lambda a: None  # never answers
    agent.exec_results.append([])
    with pytest.raises(CommandTimedOut):
        guest.run("true", deadline=Deadline.after(0.3))
    before = len(agent.received)
    guest.agent.ping(Deadline.after(5))
    assert [r["execute"] for r in agent.received[before:]] == ["guest-sync-delimited", "guest-ping"]


def test_an_agent_error_is_a_remote_error_with_its_description(fake):
    agent = fake()
    agent.handlers["guest-exec"] = lambda a: {"error": {"class": "GenericError",
                                                        "desc": "Guest agent command failed, error was 'No such file'"}}
    guest = AgentRemote.connect(agent.transport(), deadline=Deadline.after(5))
    with pytest.raises(AgentError, match="guest-exec: Guest agent command failed"):
        guest.run("true", deadline=Deadline.after(5))


def test_a_channel_that_closes_during_a_command_is_a_remote_error_and_nothing_runs_twice(fake):
    agent = fake()

    def crash(a):
        agent.theirs.close()
        return None

    agent.handlers["guest-exec"] = crash
    guest = AgentRemote.connect(agent.transport(), deadline=Deadline.after(5))
    with pytest.raises(RemoteError, match="channel closed") as e:
        guest.run("reboot", deadline=Deadline.after(5))
    assert not isinstance(e.value, CommandTimedOut)
    assert agent.commands().count("guest-exec") == 1


def test_files_go_up_and_down_in_chunks(fake, tmp_path, monkeypatch):
    import io

    from fleetbisect.remote import agent as agent_mod

    monkeypatch.setattr(agent_mod, "FILE_CHUNK", 1000)
    agent = fake()
    guest = AgentRemote.connect(agent.transport(), deadline=Deadline.after(5))
    data = bytes(range(256)) * 20  # 5120 bytes: six writes
    seen = []
    stats = guest.put_stream(io.BytesIO(data), len(data), "/tmp/x", deadline=Deadline.after(5), progress=seen.append)
    assert stats.bytes == len(data) and bytes(agent.files["/tmp/x"]) == data
    assert seen[-1] == len(data) and agent.commands().count("guest-file-write") == 6
    assert agent.commands()[-1] == "guest-file-close"
    got = guest.get("/tmp/x", tmp_path / "back", deadline=Deadline.after(5))
    assert (tmp_path / "back").read_bytes() == data and got.bytes == len(data)
    assert not (tmp_path / "back.part").exists()


def test_the_relay_quotes_the_socket_path_and_uses_socat_only_for_plain_paths():
    argv = relay_argv("/srv/fb/vm/qga.sock")
    assert argv[:2] == ["sh", "-c"] and argv[3:5] == ["sh", "/srv/fb/vm/qga.sock"] and argv[-1] == "1"
    odd = relay_argv("/srv/f b,x:y/vm/qga.sock")  # socat would split its address at , and :
    assert odd[4] == "/srv/f b,x:y/vm/qga.sock" and odd[-1] == ""


def test_the_virsh_transport_is_one_quoted_command_per_exchange():
    import re

    from fleetbisect.remote.agent import VirshTransport
    from fleetbisect.remote.fake import FakeRemote

    host = FakeRemote("vmhost")
    host.on(re.compile(r"guest-ping"), [Result("", 1, "", "error: Guest agent is not responding: timeout", 0.0),
                                        Result("", 0, '{"return":{}}\n', "", 0.0)])
    host.on(re.compile(r'"guest-exec"'), stdout='{"return":{"pid":7}}')
    host.on(re.compile(r"guest-exec-status"),
            stdout=json.dumps({"return": {"exited": True, "exitcode": 0, "out-data": b64("6.1.0\n")}}))
    transport = VirshTransport(host, "repro vm")
    with pytest.raises(AgentTimeout):  # not up yet: readiness keeps polling
        AgentRemote.connect(transport, deadline=Deadline.after(5))
    guest = AgentRemote.connect(transport, deadline=Deadline.after(5))
    assert guest.run(["uname", "-r"], deadline=Deadline.after(5)).stdout == "6.1.0\n"
    cmd = host.calls[-1].command
    assert cmd.startswith("virsh -c qemu:///system qemu-agent-command --timeout ")
    assert "'repro vm' '{\"execute\": \"guest-exec-status\"" in cmd  # every word quoted
    host.on(re.compile(r"guest-file-open"), exit_status=1, stderr="error: internal error: No such file")
    with pytest.raises(AgentError, match="No such file"):
        guest.agent.open("/nope", "r", Deadline.after(5))
