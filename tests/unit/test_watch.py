"""Stall detection (reproducers/watch.py) and how scp-stress turns a stall into a hang with its
bytes-over-time as evidence: logic only, a fake clock or a fake guest that stops moving bytes."""

from __future__ import annotations

import json
import threading

from fleetbisect.config.playbook import load_playbook
from fleetbisect.deadline import Deadline
from fleetbisect.remote.base import CommandTimedOut, Result, TransferStats, TransferTimedOut
from fleetbisect.remote.fake import FakeRemote
from fleetbisect.reproducers import ReproContext, command, scp_stress
from fleetbisect.reproducers.watch import Watch
from fleetbisect.verdict import OutcomeKind


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_stall_is_declared_once_after_stall_seconds_without_progress():
    clock, why = Clock(), []
    w = Watch(2.0, why.append, clock=clock)
    for t, done in ((0.5, 1000), (1.0, 2000), (1.5, 3000)):
        clock.t = 100 + t
        w.progress(done)
        assert not w.check()
    clock.t = 103.4  # 1.9 s after the last byte
    assert not w.check()
    clock.t = 103.6
    assert w.check() and w.stalled
    assert not w.check()  # once
    assert why == ["no progress for 2s after 3000 bytes"]
    ev = w.evidence()
    assert ev["last_progress_s"] == 1.5 and ev["stalled_at_s"] == 3.6 and ev["bytes"] == 3000


def test_progress_that_does_not_grow_is_no_progress():
    clock = Clock()
    w = Watch(1.0, clock=clock)
    w.progress(10)
    clock.t += 0.9
    w.progress(10)
    clock.t += 0.2
    assert w.check()


def test_samples_keep_the_flat_stretch_where_a_transfer_paused():
    clock = Clock()
    w = Watch(10.0, clock=clock)
    for i in range(1, 5):  # steady: one sample per SAMPLE_EVERY at most
        clock.t = 100 + i * 0.1
        w.progress(i * 100)
    clock.t = 103.0  # paused 2.6 s, then resumed
    w.progress(500)
    w.__exit__(None, None, None)
    ts = [t for t, _ in w.samples]
    assert ts == sorted(ts)
    assert [0.4, 400] in [list(s) for s in w.samples]  # where it paused
    assert [3.0, 500] in [list(s) for s in w.samples]  # where it resumed


def test_the_deadline_is_the_outer_bound_even_while_bytes_move():
    why = []
    w = Watch(None, why.append, deadline=Deadline.after(0))
    assert w.check() and w.timed_out and not w.stalled
    assert "deadline" in why[0]


class StallingGuest(FakeRemote):
    """Moves 3 MB, then nothing, until the watcher aborts it (as a cut connection would)."""

    def __init__(self, stop_after: int = 3):
        super().__init__("guest")
        self.stop_after = stop_after
        self.aborted = threading.Event()
        self.copies = 0

    def abort(self, reason: str) -> None:
        self.aborted.set()

    def put_stream(self, source, size, remote_path, *, deadline, progress=None):
        self.copies += 1
        for mb in range(1, self.stop_after + 1):
            source.read(1 << 20)
            progress(mb << 20)
        if self.copies == 1 and self.stop_after * (1 << 20) >= size:
            return TransferStats(remote_path, size, 0.1)
        self.aborted.wait(deadline.remaining())
        raise TransferTimedOut(self.name, remote_path, deadline.seconds, self.stop_after << 20)


def spec(tmp_path, text: str):
    path = tmp_path / "pb.yaml"
    path.write_text("name: t\nreproducer: {%s}\n" % text)
    return load_playbook(path).reproducers[0]


def host():
    h = FakeRemote("host")
    h.on("true", lambda c: Result(c.command, 0, "", "", 0.0))
    return h


def test_a_stalled_copy_is_a_hang_stall_seconds_after_its_last_byte(tmp_path):
    s = spec(tmp_path, "kind: scp-stress, size: 3M, iterations: 3, timeout: 60s, stall: 0.3s")
    guest = StallingGuest()
    guest.stop_after = 3
    (out,) = scp_stress.run(s, ReproContext(guest, host(), tmp_path, lambda m: None))
    assert out.kind is OutcomeKind.HANG, out.summary
    assert "no byte moved for 0.3s" in out.summary
    last = out.details["iterations"][-1]
    assert last["iteration"] == 2 and last["stalled"] and not last["timed_out"]
    # the answer came `stall` after the last byte (with the watcher's tick), not at the timeout
    assert last["stalled_at_s"] - last["last_progress_s"] >= 0.3
    assert out.details["ended_s"] - last["last_progress_s"] < 0.3 + 2
    assert last["samples"][-1] == [last["last_progress_s"], 3 << 20]
    # the log has one JSON line per transfer, with its samples
    lines = [json.loads(x) for x in (tmp_path / "reproducer.log").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 2]
    assert lines[0]["samples"][-1][1] == 3 << 20


def test_without_progress_callbacks_the_timeout_still_ends_it(tmp_path):
    s = spec(tmp_path, "kind: scp-stress, size: 8M, iterations: 1, timeout: 0.5s, stall: 0.4s")
    guest = StallingGuest(stop_after=0)
    (out,) = scp_stress.run(s, ReproContext(guest, host(), tmp_path, lambda m: None))
    assert out.kind is OutcomeKind.HANG
    assert out.details["iterations"][0]["bytes"] == 0


class QuietGuest(FakeRemote):
    """A command that prints a line, then nothing, until it is aborted."""

    def __init__(self):
        super().__init__("guest")
        self.aborted = threading.Event()

    def abort(self, reason: str) -> None:
        self.aborted.set()

    def run(self, command, *, deadline, check=False, stdin=None, output=None):
        output(b"working\n")
        self.aborted.wait(deadline.remaining())
        raise CommandTimedOut(self.name, command, deadline.seconds, Result(command, -1, "working\n", "", 0))


def test_a_command_that_prints_nothing_for_stall_seconds_is_a_hang_when_asked(tmp_path):
    s = spec(tmp_path, "kind: command, command: stress, timeout: 60s, stall: 0.3s")
    (out,) = command.run(s, ReproContext(QuietGuest(), host(), tmp_path, lambda m: None))
    assert out.kind is OutcomeKind.HANG
    assert "printed nothing for 0.3s" in out.summary
    assert out.details["output"]["last_progress_s"] < out.details["output"]["stalled_at_s"]
    assert "working" in (tmp_path / "reproducer.log").read_text()
