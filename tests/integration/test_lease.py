"""The host lease, on a real sshd: one controller per VM (the token, not the run id, says whose
lease it is), a dead run's lease taken over after expiry, a failed renewal is a lost lease."""

from __future__ import annotations

import os
import posixpath
import socket
import threading
import time

import pytest

from fleetbisect.deadline import Deadline
from fleetbisect.lease import Lease, LeaseHeld, LeaseKeeper, LeaseLost


@pytest.fixture
def work_dir(lab_host, tmp_path):
    return str(tmp_path / "work")


def lease_file(ssh, work_dir) -> str:
    return ssh.run(["cat", posixpath.join(work_dir, "lease")], deadline=Deadline.after(10)).stdout


def test_a_second_run_cannot_take_a_held_lease(ssh, work_dir):
    a = Lease.on(ssh, work_dir, "run-a")
    assert a.acquire() is None
    with pytest.raises(LeaseHeld, match="leased by run run-a"):
        Lease.on(ssh, work_dir, "run-b").acquire()
    # The holder renews its own lease (and a resumed run with the same id takes it back).
    assert a.acquire() is None
    a.release()
    assert Lease.on(ssh, work_dir, "run-b").acquire() is None
    assert lease_file(ssh, work_dir).startswith("run-b ")


def test_the_same_run_driven_by_a_second_controller_is_refused(ssh, work_dir):
    first = Lease.on(ssh, work_dir, "run-a")
    assert first.acquire() is None
    # A second `resume` of run-a while the first controller lives: the same run id, another token.
    with pytest.raises(LeaseHeld, match=r"leased by run run-a \(the same run, driven by another controller\)"):
        Lease.on(ssh, work_dir, "run-a").acquire()
    owner, expiry, holder, token = lease_file(ssh, work_dir).split()
    assert (owner, holder, token) == ("run-a", f"{socket.gethostname()}:{os.getpid()}", first.token)
    Lease.on(ssh, work_dir, "run-a").release()  # not its lease: left alone
    assert lease_file(ssh, work_dir).split()[3] == first.token
    first.release()
    assert not lease_file(ssh, work_dir)


def test_a_renewal_that_fails_marks_the_lease_lost(ssh, work_dir):
    lease = Lease.on(ssh, work_dir, "run-a")
    lease.acquire()
    renewed, lost = threading.Event(), threading.Event()
    keeper = LeaseKeeper(lease, on_lost=lambda why: lost.set(), on_renewed=renewed.set, interval=0.05).start()
    try:
        assert renewed.wait(60)
        keeper.check()  # held: no error
        # Someone took the lease away (an operator, a controller that thought ours dead).
        ssh.run(["sh", "-c", 'printf "%s\\n" "$2" > "$1"', "sh", posixpath.join(work_dir, "lease"),
                 f"run-b {int(time.time()) + 3600} elsewhere:1 othertoken"], deadline=Deadline.after(10), check=True)
        assert lost.wait(60)
    finally:
        keeper.stop()
    assert keeper.lost.startswith(f"lost the lease on {ssh.name}: ") and "leased by run run-b" in keeper.lost
    with pytest.raises(LeaseLost, match="lost the lease on"):
        keeper.check()


def test_an_expired_lease_of_a_dead_run_is_taken_over_with_a_message(ssh, work_dir):
    ssh.run(["mkdir", "-p", work_dir], deadline=Deadline.after(10), check=True)
    expired = int(time.time()) - 60
    ssh.run(["sh", "-c", 'printf "%s\\n" "$2" > "$1"', "sh", posixpath.join(work_dir, "lease"),
             f"run-dead {expired} laptop"], deadline=Deadline.after(10), check=True)
    note = Lease.on(ssh, work_dir, "run-new").acquire()
    assert note and "took over the expired lease of run run-dead (laptop)" in note
    assert lease_file(ssh, work_dir).startswith("run-new ")


def test_release_leaves_another_runs_lease_alone(ssh, work_dir):
    Lease.on(ssh, work_dir, "run-a").acquire()
    Lease.on(ssh, work_dir, "run-b").release()
    assert lease_file(ssh, work_dir).startswith("run-a ")


def test_a_lease_whose_controller_on_this_machine_is_gone_is_taken_over_at_once(ssh, work_dir):
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()  # a PID that no longer runs (a controller killed with SIGKILL)
    ssh.run(["mkdir", "-p", work_dir], deadline=Deadline.after(10), check=True)
    ssh.run(["sh", "-c", 'printf "%s\\n" "$2" > "$1"', "sh", posixpath.join(work_dir, "lease"),
             f"run-killed {int(time.time()) + 3600} {socket.gethostname()}:{gone.pid}"],
            deadline=Deadline.after(10), check=True)
    note = Lease.on(ssh, work_dir, "run-new").acquire()
    assert note and "took over the dead (its controller is gone) lease of run run-killed" in note
    # A live controller's lease is respected.
    live = f"run-live {int(time.time()) + 3600} {socket.gethostname()}:{os.getpid()}"
    ssh.run(["sh", "-c", 'printf "%s\\n" "$2" > "$1"', "sh", posixpath.join(work_dir, "lease"), live],
            deadline=Deadline.after(10), check=True)
    with pytest.raises(LeaseHeld, match="leased by run run-live"):
        Lease.on(ssh, work_dir, "run-other").acquire()
