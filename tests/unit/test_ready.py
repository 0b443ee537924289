"""wait_ready's polling: probes overlap, so one held by an early connection delays nothing."""

from __future__ import annotations

import threading

import pytest

from fleetbisect.deadline import Deadline
from fleetbisect.remote.base import TunnelRefused
from fleetbisect.stages import ready
from fleetbisect.stages.ready import BootFailed, wait_ready


def test_a_probe_held_by_an_early_connection_does_not_delay_the_answer():
    held = threading.Event()  # set only once wait_ready has returned
    calls = []

    def probe():
        calls.append(1)
        if len(calls) == 1:  # slirp accepted before the guest listened: no banner comes
            held.wait(30)
            return False
        return True  # the guest's sshd answers a later connection

    try:
        guest, _ = wait_ready(lambda d: True, probe, lambda d: "guest", Deadline.after(30))
        assert guest == "guest"
        assert not held.is_set()  # answered while the first probe still waited
    finally:
        held.set()


def test_probes_in_flight_are_bounded():
    release = threading.Event()
    running, peak = [0], [0]
    lock = threading.Lock()

    def probe():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            if running[0] == ready.PARALLEL:
                release.set()  # every slot is busy: from now on answer
        release.wait(30)
        with lock:
            running[0] -= 1
        return release.is_set() and peak[0] == ready.PARALLEL

    wait_ready(lambda d: True, probe, lambda d: "guest", Deadline.after(30))
    assert peak[0] == ready.PARALLEL


def test_a_refused_tunnel_stops_the_wait():
    def probe():
        raise TunnelRefused("host", "administratively prohibited")

    with pytest.raises(TunnelRefused):
        wait_ready(lambda d: True, probe, lambda d: "guest", Deadline.after(30))


def test_qemu_gone_is_a_boot_failure():
    with pytest.raises(BootFailed, match="exited"):
        wait_ready(lambda d: False, lambda: False, lambda d: "guest", Deadline.after(30), alive_every=0.0)
