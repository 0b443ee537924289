"""The host lease, on a real sshd: one run per VM, a dead run's lease taken over after expiry."""

from __future__ import annotations

import os
import posixpath
import time

import pytest

from fleetbisect.deadline import Deadline
from fleetbisect.lease import Lease, LeaseHeld


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
    import socket
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
