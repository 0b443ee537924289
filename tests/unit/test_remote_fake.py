"""The scripted FakeRemote, the LocalRemote, and the command helpers of remote.base."""

from __future__ import annotations

import io
import os
import re
import shlex
import time
from pathlib import Path

import pytest

from fleetbisect.deadline import Deadline
from fleetbisect.remote.base import (
    CommandTimedOut,
    RemoteCommandFailed,
    RemoteError,
    Result,
    bounded,
    command_string,
)
from fleetbisect.remote.fake import Call, FakeRemote
from fleetbisect.remote.local import LocalRemote, OutputTail

D = Deadline.after  # short alias for the tests


# --- command_string / bounded -------------------------------------------------------------


def test_command_string_quotes_lists_and_keeps_strings():
    assert command_string("echo $HOME | wc") == "echo $HOME | wc"
    words = ["printf", "%s", "a b", "it's", "$x", ""]
    assert shlex.split(command_string(words)) == words
    assert command_string(["ls", Path("/tmp/a b")]) == "ls '/tmp/a b'"


def test_bounded_wraps_in_timeout_with_a_kill_after():
    wrapped = bounded(["sleep", "10"], 2.2)
    assert shlex.split(wrapped) == ["timeout", "-k", "5", "3", "sh", "-c", "sleep 10"]
    assert shlex.split(bounded("a; b", 0))[3] == "1"  # never 0 (= no limit for timeout)
    assert shlex.split(bounded("x", 7, kill_after=2))[:4] == ["timeout", "-k", "2", "7"]


def test_bounded_really_stops_the_command():
    # the wrapper, run by a shell, kills a command that outlives its budget
    # 124 is timeout(1)'s "I stopped it": the deadline (60s) played no part
    res = LocalRemote().run(bounded("sleep 600", 1), deadline=D(60))
    assert res.exit_status == 124


# --- FakeRemote ---------------------------------------------------------------------------


def test_fake_answers_exact_and_regex_commands_and_records_calls():
    fake = FakeRemote("host")
    fake.on("uname -r", stdout="6.1.0\n")
    fake.on(re.compile(r"^mv "), exit_status=1, stderr="nope")
    assert fake.run(["uname", "-r"], deadline=D(1)).stdout == "6.1.0\n"
    res = fake.run(["mv", "a", "b"], deadline=D(1))
    assert (res.exit_status, res.stderr, res.command) == (1, "nope", "mv a b")
    assert fake.run("anything else", deadline=D(1)).ok  # not strict: exit 0
    assert fake.commands() == ["uname -r", "mv a b", "anything else"]


def test_fake_latest_handler_wins_and_sequences_repeat_their_last():
    fake = FakeRemote()
    fake.on("probe", stdout="old")
    fake.on("probe", [Result("", 1, "", "", 0), Result("", 0, "up", "", 0)])
    outs = [fake.run("probe", deadline=D(1)) for _ in range(3)]
    assert [r.exit_status for r in outs] == [1, 0, 0] and outs[-1].stdout == "up"


def test_fake_raises_and_calls_handlers():
    fake = FakeRemote("h")
    fake.on("boom", raises=RemoteError("h", "gone"))
    fake.on("echo-stdin", lambda call: Result(call.command, 0, call.stdin.decode(), "", 0))
    with pytest.raises(RemoteError, match="gone"):
        fake.run("boom", deadline=D(1))
    assert fake.run("echo-stdin", deadline=D(1), stdin=b"hi").stdout == "hi"
    fake.on("bad", exit_status=2)
    with pytest.raises(RemoteCommandFailed):
        fake.run("bad", deadline=D(1), check=True)


def test_fake_strict_rejects_unknown_commands_and_deadlines_hold():
    fake = FakeRemote(strict=True)
    with pytest.raises(LookupError):
        fake.run("rm -rf /", deadline=D(1))
    with pytest.raises(CommandTimedOut):
        fake.run("x", deadline=D(0))


def test_fake_filesystem(tmp_path):
    fake = FakeRemote()
    src = tmp_path / "k"
    src.write_bytes(b"kernel")
    seen = []
    assert fake.put(src, "/srv/k", deadline=D(1), progress=seen.append).bytes == 6
    fake.put_stream(io.BytesIO(b"abc"), 3, "/srv/s", deadline=D(1))
    assert fake.files == {"/srv/k": b"kernel", "/srv/s": b"abc"} and seen == [6]
    fake.get("/srv/s", tmp_path / "s", deadline=D(1))
    assert (tmp_path / "s").read_bytes() == b"abc"
    with pytest.raises(RemoteError):
        fake.get("/missing", tmp_path / "m", deadline=D(1))
    assert [c.kind for c in fake.calls] == ["put", "put", "get", "get"]
    assert fake.calls[0] == Call("put", "/srv/k")
    fake.close()
    with pytest.raises(RemoteError):
        fake.run("true", deadline=D(1))


# --- LocalRemote --------------------------------------------------------------------------


def test_local_run_output_status_stdin():
    local = LocalRemote()
    res = local.run("echo out; echo err >&2; exit 3", deadline=D(10))
    assert (res.exit_status, res.stdout, res.stderr) == (3, "out\n", "err\n")
    args = ["a b", "it's", "$HOME", '"q"']
    assert local.run(["printf", "%s|", *args], deadline=D(10)).stdout == "".join(a + "|" for a in args)
    data = os.urandom(2_000_000).hex().encode()  # 4 MB in while 4 MB come out: no deadlock
    res = local.run("cat", deadline=D(20), stdin=data)
    assert res.ok and res.stdout.endswith(data[-1000:].decode()) and "bytes dropped" in res.stdout[:40]
    with pytest.raises(RemoteCommandFailed):
        local.run("false", deadline=D(10), check=True)


def test_local_timeout_kills_the_process_group(tmp_path):
    pidfile = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(CommandTimedOut) as info:
        LocalRemote().run(f"echo hi; sleep 600 & echo $! > {pidfile}; wait", deadline=D(1))
    assert time.monotonic() - started >= 0.9  # the deadline fired
    assert info.value.partial.stdout == "hi\n"
    pid = int(pidfile.read_text())
    end = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < end:
        time.sleep(0.05)
    assert _gone(pid), "the background sleep survived"


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].startswith("Z")  # a zombie is dead, just not reaped


def test_local_files(tmp_path):
    local = LocalRemote()
    src = tmp_path / "a"
    src.write_bytes(b"x" * 3_000_000)
    assert local.put(src, str(tmp_path / "b"), deadline=D(10)).bytes == 3_000_000
    local.get(str(tmp_path / "b"), tmp_path / "c", deadline=D(10))
    assert (tmp_path / "c").read_bytes() == src.read_bytes()
    with pytest.raises(RemoteError):
        local.get(str(tmp_path / "missing"), tmp_path / "d", deadline=D(10))


def test_output_tail_keeps_the_end():
    tail = OutputTail(cap=10)
    for chunk in (b"0123456789", b"abcdefghij", b"KLMNOPQRST"):
        tail.add(chunk)
    assert tail.text() == "[... 20 bytes dropped ...]\nKLMNOPQRST"
    t = OutputTail()
    t.add("café".encode()[:-1])
    assert t.text() == "caf\ufffd"
