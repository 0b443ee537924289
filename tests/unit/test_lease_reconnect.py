"""A host that reboots during a step (a bare-metal box) keeps its lease: a renewal that fails
for the connection is tried again on a new one until the lease would expire; a lease another
controller took meanwhile is still lost."""

from __future__ import annotations

import re

import pytest

from fleetbisect.lease import Lease, LeaseHeld, LeaseKeeper
from fleetbisect.remote.base import RemoteError
from fleetbisect.remote.fake import FakeRemote


ANY = re.compile(".")


def test_a_renewal_on_a_dead_connection_reconnects_and_keeps_the_lease():
    dead = FakeRemote("box").on(ANY, raises=RemoteError("box", "connection lost"))
    fresh = FakeRemote("box")
    attempts = []

    def reconnect():
        attempts.append(1)
        if len(attempts) == 1:
            raise RemoteError("box", "still booting")
        return fresh

    keeper = LeaseKeeper(Lease.on(dead, "/w", "run1", ttl=300), reconnect=reconnect, interval=3600)
    keeper._stop.wait = lambda seconds: False  # the pause between reconnects: none in a unit test
    keeper._renew()
    assert keeper.lease.host is fresh and len(attempts) == 2
    assert fresh.calls and "run1" in fresh.calls[0].command  # renewed on the new connection
    assert dead.closed
    keeper.check()  # not lost


def test_a_lease_held_by_another_controller_after_the_reboot_is_lost():
    dead = FakeRemote("box").on(ANY, raises=RemoteError("box", "connection lost"))
    taken = FakeRemote("box").on(ANY, exit_status=3,
                                 stdout="held run2 9999999999 other:1 tok\n")
    keeper = LeaseKeeper(Lease.on(dead, "/w", "run1", ttl=300), reconnect=lambda: taken, interval=3600)
    with pytest.raises(LeaseHeld, match="leased by run run2"):
        keeper._renew()


def test_without_reconnect_a_failed_renewal_fails():
    dead = FakeRemote("box").on(ANY, raises=RemoteError("box", "connection lost"))
    keeper = LeaseKeeper(Lease.on(dead, "/w", "run1", ttl=300), interval=3600)
    with pytest.raises(RemoteError, match="connection lost"):
        keeper._renew()
